"""Pure tensor math: quantization grids, masks, the OBS sweep, metrics. No I/O."""

from .sources import (SHAKESPEARE_EVAL_PLAYS, calibration_ids, evaluation_ids, read_documents)

__all__ = ["SHAKESPEARE_EVAL_PLAYS", "calibration_ids", "evaluation_ids", "read_documents"]

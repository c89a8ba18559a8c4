import pytest

from slimkit.errors import RecipeError
from slimkit.recipe import Recipe, builtin_recipes, load_recipe


def test_builtins_load_and_round_trip(tmp_path):
    names = builtin_recipes()
    assert {"gptq-w4-g64", "sparsegpt-2of4-gptq-w4", "wanda-2of4-rtn-w4", "rtn-w4-channel"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name and r.description
        p = tmp_path / f"{name}.yaml"
        p.write_text(r.to_yaml())
        assert Recipe.from_yaml(p).to_dict() == r.to_dict()


@pytest.mark.parametrize("text,msg", [
    ("stages: [{method: rtn, bits: 4}]\nfoo: 1\n", "unknown recipe key 'foo'"),
    ("stages: []\n", "no stages"),
    ("stages: [{method: rtn, bits: 9}]\n", "bits"),
    ("stages: [{method: wanda, sparsity: '5:4'}]\n", "5:4"),
    ("stages: [{method: wanda}, {method: magnitude}]\n", "prunes more than once"),
    ("stages: {method: rtn}\n", "stages"),
    ("- just a list\n", "mapping"),
    ("stages: [{method: rtn}\n", "not valid YAML"),
    ("ignore: ['re:(']\nstages: [{method: rtn}]\n", "bad regex"),
])
def test_malformed_recipes(tmp_path, text, msg):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=msg):
        Recipe.from_yaml(p)


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("no-such-recipe")


def test_needs():
    r = Recipe.from_dict({"stages": [{"method": "wanda"}, {"method": "gptq"}]})
    assert r.needs == {"act_norm", "hessian"}
    assert Recipe.from_dict({"stages": [{"method": "rtn"}]}).needs == set()

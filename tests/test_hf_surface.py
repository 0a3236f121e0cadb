"""The private library surface chattune relies on (chattune.train.hf) is all there, and nothing else reaches in."""

import ast
from pathlib import Path

import pytest

from chattune.train import hf

ROOT = Path(__file__).resolve().parents[1]


def test_every_private_hook_we_rely_on_exists_with_the_expected_signature():
    assert hf.surface_problems() == []


def test_a_removed_or_changed_hook_is_reported(monkeypatch):
    import transformers

    monkeypatch.delattr(transformers.Trainer, "_get_output_dir")
    monkeypatch.setattr(transformers.Trainer, "_prepare_inputs", lambda self, batch: batch)
    problems = hf.surface_problems()
    assert any(p.startswith("transformers.Trainer._get_output_dir is gone") for p in problems)
    assert any("_prepare_inputs now takes ('self', 'batch')" in p for p in problems)


def test_the_trainer_really_calls_our_overrides():
    """The overrides are wired: Trainer's own code calls each hook (a rename upstream would bypass ours)."""
    import inspect

    import transformers

    loop = inspect.getsource(transformers.Trainer)
    for name in ("_get_num_items_in_batch", "_get_output_dir", "_save_checkpoint"):
        assert f"self.{name}(" in loop, name


def trainer_private_uses(path: Path, private: set[str]) -> list[str]:
    """Private transformers.Trainer methods a file overrides, calls on self, or calls through super()."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name in private:
            found.append(f"def {node.name}")
        if isinstance(node, ast.Attribute) and node.attr in private:
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "self") or (
                    isinstance(base, ast.Call) and getattr(base.func, "id", "") == "super"):
                found.append(node.attr)
    return found


def test_no_other_module_overrides_or_calls_a_private_trainer_hook():
    import transformers

    private = {name for name in dir(transformers.Trainer) if name.startswith("_") and not name.startswith("__")}
    offenders = {str(path.relative_to(ROOT)): uses for path in sorted((ROOT / "chattune").rglob("*.py"))
                 if path.name != "hf.py" and (uses := trainer_private_uses(path, private))}
    assert offenders == {}
    assert trainer_private_uses(ROOT / "chattune" / "train" / "hf.py", private)  # the check sees them where they are


def test_finetune_refuses_a_transformers_without_a_hook_we_need(monkeypatch, tmp_path):
    import transformers

    from chattune.errors import ConfigError
    from chattune.train.args import parse_args

    monkeypatch.delattr(transformers.Trainer, "_get_num_items_in_batch")
    with pytest.raises(ConfigError, match=r"cannot run chattune: transformers.Trainer._get_num_items_in_batch is gone"):
        parse_args(["--model_name_or_path", str(tmp_path), "--data_path", "examples/sharegpt.json", "--output_dir",
                    str(tmp_path / "out")])


def test_the_private_names_of_the_surface_appear_only_in_hf_py():
    names = {path.rsplit(".", 1)[1] for path, _, _ in hf.SURFACE} - {""}
    names = {name for name in names if name.startswith("_")}
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in names if n in path.read_text())
                 for path in sorted((ROOT / "chattune").rglob("*.py")) if path.name != "hf.py"}
    assert {k: v for k, v in offenders.items() if v} == {}

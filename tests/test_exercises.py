"""docs/exercises.md cannot rot: every exercise's flags and command, the bug's diff against today's code, and
each exercise's command run for one iteration, its answer written into a copy of the page."""

import hashlib
import importlib.util
import json
import os
import re

import pytest
from conftest import DEMO, ROOT

from nanorlhf import ablate, exercises
from nanorlhf.ablate import VARIANTS
from nanorlhf.args import parse_args
from nanorlhf.errors import UserError

PAGE = os.path.join(ROOT, "docs", "exercises.md")
BUG_DIFF = os.path.join(ROOT, exercises.BUG_DIFF)
TINY = ["--num_updates", 1, "--batch_size", 4, "--response_length", 8, "--ppo_epochs", 1, "--logging_steps", 1]


def page_text():
    with open(PAGE, encoding="utf-8") as f:
        return f.read()


def sections():
    """{exercise name: its section of the page}, found by the command each section shows."""
    found = {}
    for section in re.split(r"\n(?=## )", page_text()):
        names = set(re.findall(r"python -m nanorlhf\.exercises (\w+) --seeds 1", section))
        found.update({name: section for name in names if section.startswith("## ") and "Predict" in section})
    return found


def train_ppo_module():
    spec = importlib.util.spec_from_file_location("train_ppo", os.path.join(ROOT, "train_ppo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_exercise_trains_presets_that_parse_as_train_ppo_flags_or_a_diff_that_exists():
    train_ppo = train_ppo_module()
    assert len(exercises.EXERCISES) >= 8
    for name, exercise in exercises.EXERCISES.items():
        for variant in exercise["variants"]:
            preset, _, diff = variant.partition("=")
            if diff:
                assert os.path.isfile(os.path.join(ROOT, diff)), name
            else:
                parse_args(train_ppo.Args, [*exercises.SHARED, *VARIANTS[preset]])
        assert all(key in exercises.LOGGED for key in exercise["logged"]), name


def test_the_page_has_every_exercise_with_its_flags_a_prediction_its_command_and_an_answer_block():
    found = sections()
    assert set(found) == set(exercises.EXERCISES)
    for name, section in found.items():
        assert f"<!-- measured:{name} -->" in section and f"<!-- /measured:{name} -->" in section, name
        assert "**Predict**" in section and "<details><summary>Measured answer</summary>" in section, name
        for variant in exercises.EXERCISES[name]["variants"]:
            preset, _, diff = variant.partition("=")
            shown = f"[`{os.path.basename(diff)}`]" if diff else f"`{' '.join(VARIANTS[preset])}`"
            assert shown in section, (name, shown)
    assert "<!-- measured:run -->" in page_text()


def test_the_pages_trace_command_parses_and_its_minibatch_exists():
    from nanorlhf import trace

    command = re.search(r"python -m nanorlhf\.trace (.*?)#", page_text().replace("\\\n", " "), flags=re.S).group(1)
    args = parse_args(trace.trace_args_class(train_ppo_module().Args), command.split())
    assert args.cliprange == 1e6 and args.minibatch <= args.ppo_epochs * args.num_mini_batches


def test_the_diff_on_the_page_is_the_file_training_applies():
    block = re.search(r"```diff\n(.*?)```", page_text(), flags=re.S).group(1)
    with open(BUG_DIFF, encoding="utf-8") as f:
        assert block == f.read()


def test_the_bug_applies_to_todays_code_and_the_math_tests_catch_it_without_touching_the_checkout():
    ppo_py = os.path.join(ROOT, "nanorlhf", "ppo.py")
    before = hashlib.sha256(open(ppo_py, "rb").read()).hexdigest()
    summary, failed = exercises.failing_tests(BUG_DIFF, "tests/test_ppo_math.py")
    assert failed and all(name.startswith("test_policy_loss") for name in failed), summary
    assert re.match(rf"{len(failed)} failed, \d+ passed", summary)
    # a batch without padding cannot tell the two means apart
    assert not any(name.endswith("[full]") for name in failed)
    assert hashlib.sha256(open(ppo_py, "rb").read()).hexdigest() == before


def test_a_diff_that_does_not_apply_is_one_clear_error(tmp_path):
    diff = tmp_path / "stale.diff"
    diff.write_text("--- a/nanorlhf/ppo.py\n+++ b/nanorlhf/ppo.py\n@@ -1,1 +1,1 @@\n-no such line\n+x\n")
    with pytest.raises(UserError, match="stale.diff: does not apply to this checkout's code"):
        ablate.patched_copy(str(diff), str(tmp_path / "code"))
    with pytest.raises(UserError, match="already a variant"):
        ablate.parse_patches([f"no_kl={diff}"])


def test_fill_replaces_the_marked_block_and_nothing_else():
    text = ("a\n<!-- measured:x -->\nold\nlines\n<!-- /measured:x -->\n"
            "b\n<!-- measured:y -->\nkeep\n<!-- /measured:y -->\n")
    assert exercises.fill(text, "x", "new") == text.replace("old\nlines", "new")
    with pytest.raises(UserError, match="no <!-- measured:z -->"):
        exercises.fill(text, "z", "new")


@pytest.mark.slow
def test_exercises_run_one_iteration_and_their_answers_are_written_into_the_page(tiny_model_dir, rm_dir, tmp_path,
                                                                                 monkeypatch, capsys, forked_stages):
    """Two exercises, not all nine (each variant is a training run: the suite's time): one with two variants, and
    the patched copy. Every exercise's variants are ablate presets or the diff (checked above without training)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # exercises.main sets it; monkeypatch puts the old value back
    page = tmp_path / "exercises.md"
    page.write_text(page_text(), encoding="utf-8")
    out = tmp_path / "exercises"
    argv = ["--sft", tiny_model_dir, "--rm", rm_dir, "--data", f"{DEMO}/ppo.jsonl", "--eval_data", f"{DEMO}/test.jsonl",
            "--output_dir", out, "--seeds", 1, "--eval_max_new_tokens", 4, "--page", page, "--", *TINY]
    ran = ["lambda", "padding_bug"]
    exercises.main(list(map(str, argv[:-len(TINY) - 1])) + ran + ["--", *map(str, TINY)])
    written = page.read_text(encoding="utf-8")
    for name, exercise in exercises.EXERCISES.items():
        block = written.split(f"<!-- measured:{name} -->")[1].split(f"<!-- /measured:{name} -->")[0]
        if name not in ran:  # the blocks of the exercises not run are left as they were
            assert block == page_text().split(f"<!-- measured:{name} -->")[1].split(f"<!-- /measured:{name} -->")[0]
            continue
        rows = [line.split("|")[1].strip() for line in block.splitlines() if line.startswith("| ")][1:]
        assert rows == ["baseline"] + [exercises.variant_name(v) for v in exercise["variants"]], name
    bug = written.split("<!-- measured:padding_bug -->")[1]
    assert "on the patched copy: 5 failed" in bug and "`test_policy_loss_clipping_by_hand`" in bug
    # the patched run trained the copy: it says which diff, and ablate refuses to mix it with another change
    result = json.loads((out / "10-iterations" / "padding_bug" / "seed-1" / "result.json").read_text())
    assert result["patch"].startswith("bug_padding_in_policy_loss.diff (sha256 ")
    other = tmp_path / "bug_padding_in_policy_loss.diff"
    other.write_text(open(BUG_DIFF, encoding="utf-8").read().replace(".mean()", ".sum()"), encoding="utf-8")
    monkeypatch.setattr(exercises, "ROOT", str(tmp_path))
    monkeypatch.setattr(exercises, "BUG_DIFF", other.name)
    monkeypatch.setitem(exercises.EXERCISES, "padding_bug",
                        {**exercises.EXERCISES["padding_bug"], "variants": [f"padding_bug={other.name}"]})
    with pytest.raises(UserError, match="ran with other code"):
        exercises.main(list(map(str, argv[:-len(TINY) - 1])) + ["padding_bug", "--", *map(str, TINY)])

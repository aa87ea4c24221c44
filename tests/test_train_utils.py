"""Training plumbing: the schedule, the data order on resume, the token-mean loss under gradient
accumulation, atomic checkpoints, RNG state, and the command line."""

import dataclasses
import itertools
import math
import os
import random
import re

import numpy as np
import pytest
import torch

from nanorlhf import train_utils as tu
from nanorlhf.errors import UserError


# ---------------------------------------------------------------- the schedule

def lr_factors(total_steps, warmup_ratio, steps):
    """The lr multiplier in effect at each of `steps` (after that many scheduler.step() calls)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = tu.warmup_cosine(optimizer, total_steps, warmup_ratio)
    out = {}
    for step in range(max(steps) + 1):
        if step in steps:
            out[step] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_is_linear_up_to_the_peak():
    # 100 steps, 10% warmup = 10 steps: 1/10, 2/10, ... 10/10
    assert lr_factors(100, 0.1, [0, 1, 4, 9]) == pytest.approx({0: 0.1, 1: 0.2, 4: 0.5, 9: 1.0})


def test_cosine_decays_from_the_peak_to_a_tenth():
    # after warmup, progress = (step - 10) / 90; factor = 0.1 + 0.9 * (1 + cos(pi * progress)) / 2
    assert lr_factors(100, 0.1, [10, 55, 100, 130]) == pytest.approx({10: 1.0, 55: 0.55, 100: 0.1, 130: 0.1})
    # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2
    assert lr_factors(40, 0.0, [10])[10] == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)


def test_no_warmup_starts_at_the_peak():
    assert lr_factors(10, 0.0, [0])[0] == 1.0


def test_warmup_is_at_least_one_step():
    assert lr_factors(10, 0.03, [0, 1]) == pytest.approx({0: 1.0, 1: 1.0})  # int(0.3) -> 1 step of warmup


# ---------------------------------------------------------------- data order

def take(generator, n):
    return list(itertools.islice(generator, n))


def test_micro_batches_cover_every_example_once_per_epoch():
    batches = take(tu.micro_batches(10, 4, seed=0), 6)  # 3 per epoch: sizes 4, 4, 2
    assert [epoch for epoch, _ in batches] == [0, 0, 0, 1, 1, 1]
    assert [len(idx) for _, idx in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (0, 1):
        assert sorted(sum((idx for e, idx in batches if e == epoch), [])) == list(range(10))


def test_micro_batches_reshuffle_every_epoch_and_depend_on_the_seed():
    batches = take(tu.micro_batches(50, 50, seed=0), 2)
    assert batches[0][1] != batches[1][1]
    assert take(tu.micro_batches(50, 50, seed=1), 1)[0][1] != batches[0][1]


@pytest.mark.parametrize("skip", [0, 1, 2, 3, 7])
def test_micro_batches_skip_k_resumes_where_the_first_k_left_off(skip):
    full = take(tu.micro_batches(10, 4, seed=5), skip + 6)
    assert take(tu.micro_batches(10, 4, seed=5, skip=skip), 6) == full[skip:]


# ---------------------------------------------------------------- the loss

def test_lm_loss_sum_is_the_summed_next_token_cross_entropy_over_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 6, 0, -100]])
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(4):  # the logits at t predict the token at t + 1
            target = labels[b, t + 1].item()
            if target != -100:
                expected += -torch.log_softmax(logits[b, t], -1)[target].item()
                count += 1
    loss_sum, n = tu.lm_loss_sum(logits, labels)
    assert n.item() == count == 5
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)


def test_lm_loss_sum_ignores_minus_100_whatever_the_logits_there():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[3, 1, -100, 2]])
    changed = logits.clone()
    changed[0, 1] = 100.0  # the logits predicting the ignored position 2
    assert tu.lm_loss_sum(changed, labels)[0].item() == \
        pytest.approx(tu.lm_loss_sum(logits, labels)[0].item())


def test_lm_loss_sum_does_not_score_the_first_label():
    logits = torch.zeros(1, 3, 4)
    assert tu.lm_loss_sum(logits, torch.tensor([[1, -100, -100]]))[1].item() == 0
    assert tu.lm_loss_sum(logits, torch.tensor([[-100, 1, -100]]))[1].item() == 1


def accumulated_grad(model, micro_batches):
    """The scripts' recipe: sum each micro-batch's loss, divide by the tokens of the whole step."""
    model.zero_grad()
    n_tokens = sum((labels[:, 1:] != -100).sum().item() for _, labels in micro_batches)
    for ids, labels in micro_batches:
        loss_sum, _ = tu.lm_loss_sum(model(ids), labels)
        (loss_sum / n_tokens).backward()
    return model.weight.grad.clone()


class Bigram(torch.nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, ids):
        return self.weight[ids]


def test_gradient_accumulation_equals_one_big_batch_token_mean():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 1, 2], [3, 5, 7, 9, 2, 4]])
    labels = ids.clone()
    labels[0, :5] = -100  # 1 labelled target in row 0, 5 in rows 1 and 2: micro-batch means would differ
    model = Bigram()
    big = accumulated_grad(model, [(ids, labels)])
    accumulated = accumulated_grad(model, [(ids[:1], labels[:1]), (ids[1:], labels[1:])])
    assert torch.allclose(accumulated, big, atol=1e-7)

    # the naive recipe (mean of per-micro-batch means) is a different gradient: the test can tell
    model.zero_grad()
    for x, y in [(ids[:1], labels[:1]), (ids[1:], labels[1:])]:
        loss_sum, n = tu.lm_loss_sum(model(x), y)
        (loss_sum / n / 2).backward()
    assert not torch.allclose(model.weight.grad, big, atol=1e-4)


# ---------------------------------------------------------------- atomic writes and checkpoints

def write_files(files):
    def write(tmp):
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
    return write


def test_atomic_save_replaces_files_and_leaves_no_tmp_dir(tmp_path):
    out = tmp_path / "model"
    tu.atomic_save(str(out), write_files({"a.json": "old", "b.json": "old"}))
    tu.atomic_save(str(out), write_files({"a.json": "new"}))
    assert (out / "a.json").read_text() == "new"
    assert (out / "b.json").read_text() == "old"  # a model dir keeps what it held (e.g. metrics.jsonl)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_save_replaces_a_checkpoint_dir_whole(tmp_path):
    ckpt = tmp_path / "checkpoint-5"
    tu.atomic_save(str(ckpt), write_files({"a": "old", "b": "old"}))
    tu.atomic_save(str(ckpt), write_files({"a": "new"}))
    assert sorted(os.listdir(ckpt)) == ["a"]
    assert (ckpt / "a").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]


def test_atomic_save_killed_while_writing_keeps_the_old_files(tmp_path):
    out = tmp_path / "model"
    tu.atomic_save(str(out), write_files({"a": "old"}))

    def crash(tmp):
        write_files({"a": "half"})(tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tu.atomic_save(str(out), crash)
    assert (out / "a").read_text() == "old"
    tu.atomic_save(str(out), write_files({"a": "new"}))  # the next save clears the leftover temp dir
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_save_replaces_a_folder_from_an_earlier_save(tmp_path):
    out = tmp_path / "ppo"  # PPO's final save holds critic/; a rerun with --resume saves it again

    def write(text):
        def go(tmp):
            os.makedirs(os.path.join(tmp, "critic"))
            write_files({"head": text})(os.path.join(tmp, "critic"))
        return go

    tu.atomic_save(str(out), write("old"))
    tu.atomic_save(str(out), write("new"))
    assert (out / "critic" / "head").read_text() == "new"


def test_metrics_on_resume_keep_the_steps_up_to_the_checkpoint_and_drop_a_line_cut_short(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')  # killed mid-write
    tu.Metrics(str(tmp_path), resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def make_checkpoint(root, name, complete=True):
    path = root / name
    path.mkdir()
    if complete:
        (path / "trainer_state.pt").write_bytes(b"")
    return str(path)


def test_list_checkpoints_sorts_by_step_and_ignores_tmp_and_incomplete_dirs(tmp_path):
    c2 = make_checkpoint(tmp_path, "checkpoint-2")
    c10 = make_checkpoint(tmp_path, "checkpoint-10")
    c9 = make_checkpoint(tmp_path, "checkpoint-9")
    make_checkpoint(tmp_path, ".tmp-checkpoint-12")
    make_checkpoint(tmp_path, "checkpoint-11", complete=False)
    make_checkpoint(tmp_path, "checkpoint-best")
    assert tu.list_checkpoints(str(tmp_path)) == [c2, c9, c10]


def test_list_checkpoints_of_a_missing_dir_is_empty(tmp_path):
    assert tu.list_checkpoints(str(tmp_path / "nope")) == []


def test_save_checkpoint_keeps_the_newest_save_total_limit(tmp_path):
    for step in (1, 2, 3):
        tu.save_checkpoint(str(tmp_path), step, write_files({"w": str(step)}), {"x": torch.tensor(step)},
                           save_total_limit=2)
    assert tu.list_checkpoints(str(tmp_path)) == [str(tmp_path / f"checkpoint-{n}") for n in (2, 3)]
    state = tu.load_trainer_state(str(tmp_path / "checkpoint-3"))
    assert (state["step"], state["x"].item()) == (3, 3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]


# ---------------------------------------------------------------- RNG state

def draw():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_state_round_trip_gives_the_same_next_random_numbers():
    tu.set_seed(123)
    draw()
    state = tu.rng_state()
    expected = draw()
    draw()
    tu.set_rng_state(state)
    assert draw() == expected


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    tu.set_seed(7)
    torch.save({"rng": tu.rng_state()}, tmp_path / "s.pt")
    expected = draw()
    tu.set_seed(99)
    tu.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert draw() == expected


# ---------------------------------------------------------------- the command line

@dataclasses.dataclass
class Args(tu.BaseArgs):
    """A stage."""
    block_size: int = dataclasses.field(default=128, metadata={"help": "tokens per block"})
    whiten: bool = dataclasses.field(default=True, metadata={"help": "a switch that is on by default"})


def test_bool_flags_take_a_no_form():
    assert tu.parse_args(Args, []).resume is False
    assert tu.parse_args(Args, ["--resume"]).resume is True
    assert tu.parse_args(Args, ["--resume", "--no-resume"]).resume is False
    assert tu.parse_args(Args, []).whiten is True
    assert tu.parse_args(Args, ["--no-whiten"]).whiten is False


def test_typed_flags_are_parsed_to_their_type():
    args = tu.parse_args(Args, ["--learning_rate", "3e-4", "--block_size", "64", "--data", "a.txt,b.txt"])
    assert (args.learning_rate, args.block_size, args.data) == (3e-4, 64, "a.txt,b.txt")
    assert args.max_steps == -1 and args.finetuning_type == "lora"


def test_bad_finetuning_type_is_a_user_error():
    with pytest.raises(UserError, match=r"^--finetuning_type must be lora or full, got 'qlora'$"):
        tu.parse_args(Args, ["--finetuning_type", "qlora"])


def test_an_unknown_flag_is_one_line_naming_it():
    with pytest.raises(UserError, match=r"^unrecognized arguments: --do_train$"):
        tu.parse_args(Args, ["--do_train"])


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: Qwen2.5-0.5B  # LLaMA-Factory's name for --model\nlearning_rate: 1e-4\n"
                    "block_size: 64\nwhiten: false\ncutoff_len: 1024\noverwrite_output_dir: true\n", encoding="utf-8")
    args = tu.parse_args(Args, [str(path), "--block_size", "32"])
    assert (args.model, args.learning_rate, args.block_size, args.whiten, args.max_length, args.overwrite_output_dir) \
        == ("Qwen2.5-0.5B", 1e-4, 32, False, 1024, True)
    json_path = tmp_path / "sft.json"
    json_path.write_text('{"learning_rate": 0.001, "num_train_epochs": 2}', encoding="utf-8")
    from_json = tu.parse_args(Args, [str(json_path)])
    assert (from_json.learning_rate, from_json.num_train_epochs) == (0.001, 2.0)


@pytest.mark.parametrize("text,error", [
    ("do_train: true\n", "{p}: unknown flag 'do_train'"),
    ("block_size: many\n", "{p}: block_size must be int, got 'many'"),
    ("report_to: wandb\n", "{p}: report_to must be one of none, tensorboard, got 'wandb'"),
    ("- a list\n", "{p}: a config file must map flag names to values, got list"),
    ("a: [1\n", "{p}:2: malformed config: "),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, text, error):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="^" + re.escape(error.format(p=path))):
        tu.parse_args(Args, [str(path)])
    with pytest.raises(UserError, match=r"no such config file"):
        tu.parse_args(Args, [str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("stage", ["pt", "sft", "rm", "ppo"])
def test_every_example_config_is_read_by_its_stage(stage):
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = runpy.run_path(os.path.join(root, f"train_{stage}.py"), run_name="example")  # its Args, not main()
    args = tu.parse_args(script["Args"], [os.path.join(root, "examples", f"{stage}.yaml")])
    assert args.output_dir == f"runs/{stage}"


def test_overwrite_output_dir_replaces_an_earlier_run_and_resume_keeps_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="already holds a run; pass --resume to continue it, --overwrite_output_dir"):
        tu.prepare_output_dir(str(out), resume=False)
    tu.prepare_output_dir(str(out), resume=True)
    assert (out / "metrics.jsonl").exists()
    tu.prepare_output_dir(str(out), resume=False, overwrite=True)
    assert out.is_dir() and not (out / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="pick one"):
        tu.parse_args(Args, ["--resume", "--overwrite_output_dir"])


def test_total_steps_from_epochs_and_accumulation():
    args = Args(num_train_epochs=2.0, gradient_accumulation_steps=4)
    assert tu.total_steps(args, batches_per_epoch=10) == 5  # ceil(10 * 2 / 4)
    assert tu.total_steps(Args(max_steps=3), batches_per_epoch=10) == 3

"""One PPO iteration, every number: what train_ppo.py computed for each token of a sequence or two.

    python -m nanorlhf.trace --sft runs/demo/sft-merged --rm runs/demo/rm-merged --data data/demo/ppo.jsonl
    python -m nanorlhf.trace ... --num_updates 5 --sequences 0,3 --minibatch 4 --plot trace.png

Any train_ppo.py flag works here too. For each shown sequence, one line per response token: the token, its
log-prob under the policy and the reference, the KL term (--kl_estimator), the shaped reward (-kl_coef * kl,
plus the score on the last token), the critic's value, the advantage before and after whitening, the
return; and from the update, in one minibatch (--minibatch, default the first), the ratio pi / pi_old,
whether the clip was active, and the token's policy and value loss terms. Then the batch's totals beside
the row train_ppo.py logged to metrics.jsonl for the same iteration: they agree.

How, and why so: the trace does not redo the iteration, it watches train_ppo.py do it. It runs the
script's own main() in this process, for --num_updates iterations (default 1; the last one is shown), and
wraps three of the functions the loop calls by name:
  generate            step 1's rollout dict, which steps 2-6 fill in place; a "row" column is added to it,
                      which every minibatch then carries, so the update's rows can be told apart
  ppo_loss            each micro-batch of step 7: its rows, the log-probs and values its loss was
                      computed from, and that loss's own statistics
  iteration_metrics   step 5's shaped rewards and the KL coefficient they used
So every number is the one training used, and the loop keeps its seven steps with nothing added for
inspection (a flag that dumps tensors would need lines in three places of it). Derived from those, by
the functions and formulas training uses: the advantages before whitening (ppo.estimate_advantages on the
same rewards and values, checked to whiten to the advantages used) and the update's per-token columns
(ppo.policy_loss's and ppo.value_loss's formulas term by term; averaged as the loss is averaged, they give
the logged loss/policy_avg, loss/value_avg and clip fractions).

The first minibatch comes before any optimizer step, so there the policy is still pi_old: its ratio is 1
and nothing is clipped. A later --minibatch shows the clip at work; a later --num_updates, a policy that
has moved from the reference (kl != 0).
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import unicodedata
import warnings

import torch

from nanorlhf import ppo
from nanorlhf.args import parse_args
from nanorlhf.errors import UserError, run_main
from nanorlhf.files import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (column, width): t, the token, ten numbers and the update's ratio and clip; about 120 characters
COLUMNS = [("t", 3), ("token", 12), ("logprob", 8), ("ref_lp", 8), ("kl", 8), ("reward", 8), ("value", 8),
           ("adv", 8), ("adv_w", 8), ("return", 8), ("ratio", 6), ("clip", 4), ("pg_loss", 8), ("vf_loss", 8)]


def load_train_ppo():
    """train_ppo.py of this checkout, as a module (it is a script beside the package, not part of it)."""
    path = os.path.join(ROOT, "train_ppo.py")
    if not os.path.isfile(path):
        raise UserError(f"{ROOT}: no train_ppo.py; run the trace from a nanorlhf checkout")
    module = sys.modules.get("train_ppo")
    if module is None or os.path.abspath(getattr(module, "__file__", "")) != path:
        spec = importlib.util.spec_from_file_location("train_ppo", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_ppo"] = module
        spec.loader.exec_module(module)
    return module


def trace_args_class(Args):
    """train_ppo.py's flags, and the trace's own."""
    @dataclasses.dataclass
    class TraceArgs(Args):
        """One PPO iteration of train_ppo.py, every number per token (any train_ppo.py flag works)."""
        sequences: str = dataclasses.field(default="", metadata={
            "help": "rows of the rollout batch to show, comma-separated (default: the first two of --minibatch)"})
        minibatch: int = dataclasses.field(default=1, metadata={
            "help": "the update's columns come from this minibatch (1 = the first, before any optimizer step)",
            "range": ">0"})
        plot: str = dataclasses.field(default="", metadata={"help": "also draw the first sequence's tokens into "
                                                            "this .png (needs matplotlib)"})
    return TraceArgs


@contextlib.contextmanager
def replaced(module, **functions):
    """Set module attributes for the duration of a `with`, then put the originals back."""
    missing = [name for name in functions if not hasattr(module, name)]
    if missing:  # the trace reads train_ppo.py through these names (see the module docstring)
        raise RuntimeError(f"{module.__file__} has no {', '.join(missing)}: update nanorlhf/trace.py to match it")
    originals = {name: getattr(module, name) for name in functions}
    for name, function in functions.items():
        setattr(module, name, function)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def record(train_ppo, args):
    """Run train_ppo.py's main() with `args` (a train_ppo.Args) and return what it computed in its last
    iteration: {"rollout", "rewards", "kl_coef", "micro_batches" (one dict per ppo_loss call, in order)}."""
    seen = {}
    generate_original, ppo_loss_original, iteration_metrics_original = (
        getattr(train_ppo, name, None) for name in ("generate", "ppo_loss", "iteration_metrics"))  # see replaced

    def generate(*a, **kw):
        rollout = generate_original(*a, **kw)
        rollout["row"] = torch.arange(len(rollout["response"]), device=rollout["response"].device)
        seen.clear()  # a new iteration
        seen.update(rollout=rollout, micro_batches=[])
        return rollout

    def ppo_loss(policy_and_value, mb, args, losses):
        out = {}

        def forward(batch):
            logits, vpred = policy_and_value(batch)
            with torch.no_grad():
                out["new_logprobs"] = ppo.logprobs_from_logits(logits.detach(), batch["response"])
                out["vpred"] = None if vpred is None else vpred.detach()
            return logits, vpred

        loss = ppo_loss_original(forward, mb, args, losses)
        stats = {name: xs[-1].item() for name, xs in losses.items()}  # this micro-batch's, as training computed
        seen["micro_batches"].append({"row": mb["row"], "stats": stats, **out})
        return loss

    def iteration_metrics(rollout, rewards, ended, losses, weights, n_minibatches, kl_coef, args):
        seen.update(rewards=rewards, ended=ended, kl_coef=kl_coef)
        return iteration_metrics_original(rollout, rewards, ended, losses, weights, n_minibatches, kl_coef, args)

    with replaced(train_ppo, parse_args=lambda cls: args, generate=generate, ppo_loss=ppo_loss,
                  iteration_metrics=iteration_metrics):
        train_ppo.main()
    return seen


def update_terms(rollout, micro, args):
    """The update's per-token numbers in one micro-batch, with ppo.policy_loss's and ppo.value_loss's
    formulas term by term: {"log_ratio", "ratio", "clipped", "pg_loss", "vf_loss", "vf_clipped"} [b, R],
    0 on padding (ratio 1)."""
    rows, new_logprobs = micro["row"], micro["new_logprobs"]
    columns = new_logprobs.size(1)  # the micro-batch may have been trimmed to its longest response
    real = rollout["response_mask"][rows, :columns] > 0
    at = lambda key: rollout[key][rows, :columns]  # noqa: E731
    log_ratio = torch.where(real, new_logprobs - at("logprobs"), 0.0)
    ratio = torch.exp(log_ratio)
    pg_losses = -at("advantages") * ratio
    pg_losses2 = -at("advantages") * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    terms = {"log_ratio": log_ratio, "ratio": ratio, "clipped": (pg_losses2 > pg_losses).float(),
             "pg_loss": torch.max(pg_losses, pg_losses2)}
    vpred = micro["vpred"]
    if vpred is not None:
        vf_losses1 = (vpred - at("returns")) ** 2
        vf_losses2 = vf_losses1
        if args.cliprange_value > 0:
            vpredclipped = at("values") + torch.clamp(vpred - at("values"), -args.cliprange_value,
                                                      args.cliprange_value)
            vf_losses2 = (vpredclipped - at("returns")) ** 2
        terms.update(vf_loss=0.5 * torch.max(vf_losses1, vf_losses2), vf_clipped=(vf_losses2 > vf_losses1).float())
    width = rollout["response"].size(1)
    return {k: torch.nn.functional.pad(torch.where(real, v, 0.0), (0, width - columns)) for k, v in terms.items()}


def tokens_of(seen, args):
    """What the table shows, on the CPU: the rollout's [B, R] and [B] tensors, plus rewards, kl,
    adv_raw (before whitening), and per minibatch of the update a dict of `update_terms` with its rows and
    the training's own statistics of each micro-batch."""
    rollout, mask = seen["rollout"], seen["rollout"]["response_mask"]
    advantages_raw, _ = ppo.estimate_advantages(seen["rewards"], rollout["values"], mask, args.advantage_estimator,
                                                args.gamma, args.lam, args.num_samples_per_prompt)
    used = ppo.masked_whiten(advantages_raw, mask) if args.whiten_advantages else advantages_raw
    if args.clamp_stop_advantage:
        used = ppo.clamp_stop_advantages(used, mask, seen["ended"])
    if not torch.allclose(used, rollout["advantages"], rtol=1e-5, atol=1e-6):
        raise RuntimeError("the trace's advantages differ from train_ppo.py's: step 6 changed, update trace.py")
    t = {key: value.detach().cpu() for key, value in rollout.items()}
    t.update(rewards=seen["rewards"].cpu(), adv_raw=advantages_raw.cpu(), ended=seen["ended"].cpu(),
             kl=torch.where(t["response_mask"] > 0,
                            ppo.kl_penalty(t["logprobs"], t["ref_logprobs"], args.kl_estimator), 0.0))
    # step 7's micro-batches, grouped into its minibatches (one process: batch_size / num_mini_batches rows)
    minibatch_size, minibatches = args.batch_size // args.num_mini_batches, []
    for micro in seen["micro_batches"]:
        micro = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in micro.items()}
        if not minibatches or sum(len(m["row"]) for m in minibatches[-1]) == minibatch_size:
            minibatches.append([])
        minibatches[-1].append({**micro, **update_terms(t, micro, args)})
    t["minibatches"] = minibatches
    return t


def compare(t, logged, kl_coef, args):
    """The batch's totals from the table's numbers beside the row train_ppo.py logged for the iteration:
    [(name, how it is computed, traced, logged)]."""
    real, scores = t["response_mask"] > 0, t["scores"]
    kl = torch.where(real, t["logprobs"] - t["ref_logprobs"], 0.0).sum(1)  # k1, as the log's objective/kl

    def per_minibatch(term):  # each minibatch's token mean (padding is 0), averaged over the minibatches
        return torch.stack([sum(m[term].sum() for m in mb) / sum(real[m["row"]].sum() for m in mb)
                            for mb in t["minibatches"]]).mean().item()

    first = t["minibatches"][0][0]
    first_real = t["response_mask"][first["row"]] > 0
    rows = [("objective/scores", "mean of the scores (the reward on each last token)", scores.mean().item()),
            ("objective/kl", "mean over sequences of sum_t (logprob - ref_lp)", kl.mean().item())]
    if args.kl_estimator != "k1":
        rows.append((f"objective/kl_{args.kl_estimator}", "mean over sequences of sum_t kl",
                     t["kl"].sum(1).mean().item()))
    if not args.whiten_rewards:
        rows.append(("objective/non_score_reward", "mean over sequences of sum_t reward - score",
                     ((t["rewards"] * real).sum(1) - scores).mean().item()))
    rows += [("objective/rlhf_reward", f"mean of score - kl_coef ({kl_coef:g}) x kl",
              (scores - kl_coef * kl).mean().item()),
             ("val/first_clipfrac", "share of clipped tokens, first micro-batch",
              (first["clipped"].sum() / first_real.sum()).item()),
             ("val/first_approxkl", "0.5 x mean log(ratio)^2, first micro-batch",
              (0.5 * (first["log_ratio"] ** 2).sum() / first_real.sum()).item()),
             ("policy/clipfrac_avg", "share of clipped tokens per minibatch, averaged", per_minibatch("clipped")),
             ("loss/policy_avg", "mean pg_loss per minibatch, averaged", per_minibatch("pg_loss"))]
    if "vf_loss" in first:
        rows += [("loss/value_avg", "mean vf_loss per minibatch, averaged", per_minibatch("vf_loss")),
                 ("val/clipfrac_avg", "share of value-clipped tokens per minibatch", per_minibatch("vf_clipped"))]
    return [(name, how, traced, logged.get(name)) for name, how, traced in rows]


def number(x, width=8):
    """x in `width` characters: four decimals where they fit and say something, else scientific."""
    x = x + 0.0  # -0.0 -> 0.0
    text = f"{x:.4f}"
    if x != 0 and (abs(x) < 1e-3 or len(text) > width):
        text = f"{x:.1e}"
    return text.rjust(width)


def columns_on_screen(text):
    """How many terminal columns text takes: Chinese, Japanese, Korean characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def token_cell(text, width):
    """A token as Python writes it (quoted, control characters escaped), cut to `width` columns."""
    text = repr(text)
    while columns_on_screen(text) > width:
        text = text[:-2] + "~"
    return text + " " * (width - columns_on_screen(text))


def line(cells):
    return " ".join(cell if name == "token" else cell.rjust(width)
                    for cell, (name, width) in zip(cells, COLUMNS)).rstrip()


def in_minibatch(t, row, minibatch):
    """(micro-batch, index of `row` in it) in the update's minibatch number `minibatch`; None if not in it."""
    for micro in t["minibatches"][minibatch - 1]:
        hits = (micro["row"] == row).nonzero()
        if len(hits):
            return micro, int(hits[0])
    return None


def token_table(t, row, minibatch, tokenizer):
    """One sequence: a header, the column names, a line per real response token, their sums."""
    real = t["response_mask"][row] > 0
    n, width = int(real.sum()), len(real)
    update = in_minibatch(t, row, minibatch)
    prompt = tokenizer.decode(t["query"][row][t["query_mask"][row] > 0], skip_special_tokens=True).strip()
    lines = [f"sequence {row}: {n} tokens, " + ("ended at EOS" if t["ended"][row] else "cut off (no EOS)")
             + f", score {t['scores'][row].item():.4f}; "
             + (f"update columns from minibatch {minibatch}" if update else f"not in minibatch {minibatch}"),
             f"prompt: {repr(prompt[-100:])}",
             line([name.ljust(width) if name == "token" else name for name, width in COLUMNS])]
    for i in range(n):
        cells = [str(i), token_cell(tokenizer.decode([int(t["response"][row, i])]), 12)]
        cells += [number(t[key][row, i].item()) for key in ("logprobs", "ref_logprobs", "kl", "rewards", "values",
                                                            "adv_raw", "advantages", "returns")]
        if update:
            micro, j = update
            cells += [f"{micro['ratio'][j, i].item():.4f}", "yes" if micro["clipped"][j, i] else "-",
                      number(micro["pg_loss"][j, i].item()),
                      number(micro["vf_loss"][j, i].item()) if "vf_loss" in micro else "-"]
        else:
            cells += ["-"] * 4
        lines.append(line(cells))
    lines.append(line(["", "sum".ljust(12), "", "", number(t["kl"][row].sum().item()),
                       number(t["rewards"][row].sum().item())]))
    if n < width:
        lines.append(f"(then {width - n} padding tokens: mask 0, they add nothing to any sum or loss)")
    return lines


LEGEND = [
    "kl: the --kl_estimator term (k1 = logprob - ref_lp); reward = -kl_coef x kl, + the score on the last token;",
    "adv: the advantage (GAE, or --advantage_estimator) before whitening, adv_w after; return = adv + value;",
    "ratio = pi / pi_old; pg_loss = max(-adv_w x ratio, -adv_w x clip(ratio)); vf_loss = 0.5 x max(squared errors)"]


def summary(comparison, iteration, n_sequences, kl_coef):
    """The batch's totals from the table beside the logged row, and whether each pair agrees."""
    lines = [f"iteration {iteration}: {n_sequences} sequences, kl_coef {kl_coef:g}; the table's numbers over the "
             f"whole batch beside metrics.jsonl (step {iteration})",
             f"{'metric':<27}{'computed from the table':<52}{'trace':>14}{'logged':>14}"]
    for name, how, traced, logged in comparison:
        agree = logged is not None and abs(traced - logged) <= 1e-6 + 1e-5 * abs(logged)
        lines.append(f"{name:<27}{how:<52}{traced:>14.7g}{'-' if logged is None else f'{logged:.7g}':>14}"
                     + ("" if agree else "  <- differs"))
    return lines


def plot_tokens(t, row, minibatch, tokenizer, cliprange, path):
    """One sequence's tokens as curves: log-probs, KL, rewards and advantages, the update's ratio and loss terms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int((t["response_mask"][row] > 0).sum())
    x = list(range(n))
    update = in_minibatch(t, row, minibatch)
    fig, axes = plt.subplots(5 if update else 3, 1, figsize=(max(8, 0.2 * n), 12 if update else 8), sharex=True)

    def curve(ax, values, label, **kw):
        ax.plot(x, values[:n].tolist(), label=label, marker=".", **kw)

    curve(axes[0], t["logprobs"][row], "logprob (policy)")
    curve(axes[0], t["ref_logprobs"][row], "ref_lp (reference)", linestyle="--")
    curve(axes[1], t["kl"][row], "kl")
    for key, label in (("rewards", "reward"), ("values", "value"), ("adv_raw", "adv (raw)"),
                       ("advantages", "adv_w (whitened)"), ("returns", "return")):
        curve(axes[2], t[key][row], label)
    if update:
        micro, j = update
        curve(axes[3], micro["ratio"][j], f"ratio (minibatch {minibatch})")
        clipped = [i for i in x if micro["clipped"][j, i]]
        axes[3].scatter(clipped, [micro["ratio"][j, i].item() for i in clipped], color="red", zorder=3,
                        label="clip active")
        for bound in (1 - cliprange, 1 + cliprange):
            axes[3].axhline(bound, color="grey", linestyle=":")
        for key in ("pg_loss", "vf_loss"):
            if key in micro:
                curve(axes[4], micro[key][j], key)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    if n <= 120:
        axes[-1].set_xticks(x, [repr(tokenizer.decode([int(i)]))[1:-1] for i in t["response"][row, :n]],
                            rotation=90, fontsize=7)
    axes[-1].set_xlabel("response token")
    axes[0].set_title(f"sequence {row}: score {t['scores'][row].item():.3f}")
    with warnings.catch_warnings():  # a glyph the font lacks is drawn as a box; no need to say so per token
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    plt.close(fig)


def trace(argv=None):
    """Parse the flags, run the iteration(s), read the logged row back: (args, t, comparison, tokenizer), with
    t["kl_coef"] the coefficient the iteration used and args.sequences the rows to show, as a list."""
    train_ppo = load_train_ppo()
    args = parse_args(trace_args_class(train_ppo.Args), argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError('--plot needs matplotlib: pip install -e ".[plot]"') from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("the trace runs one process: start it with python, not torchrun")
    steps = args.ppo_epochs * args.num_mini_batches
    if args.minibatch > steps:
        raise UserError(f"--minibatch {args.minibatch}: an iteration has {steps} (--ppo_epochs x --num_mini_batches)")
    try:
        rows = [int(r) for r in args.sequences.split(",") if r.strip()]
    except ValueError:
        rows = [-1]
    if any(not 0 <= r < args.batch_size for r in rows):
        raise UserError(f"--sequences {args.sequences}: rows of the batch, comma-separated, 0 to {args.batch_size - 1}")
    with tempfile.TemporaryDirectory() as tmp:
        flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(train_ppo.Args)}
        ppo_args = train_ppo.Args(**{**flags, "num_updates": args.num_updates or 1,
                                     "output_dir": args.output_dir or os.path.join(tmp, "ppo")})
        seen = record(train_ppo, ppo_args)
        with open(os.path.join(ppo_args.output_dir, "metrics.jsonl"), encoding="utf-8") as f:
            logged = [json.loads(line) for line in f][-1]  # the last iteration is always logged
    t = tokens_of(seen, ppo_args)
    t["kl_coef"] = seen["kl_coef"]
    args.num_updates = ppo_args.num_updates
    args.sequences = rows or t["minibatches"][args.minibatch - 1][0]["row"][:2].tolist()
    return args, t, compare(t, logged, seen["kl_coef"], ppo_args), train_ppo.load_tokenizers(ppo_args)[0]


def main(argv=None):
    args, t, comparison, tokenizer = trace(argv)
    lines = []
    for row in args.sequences:
        lines += token_table(t, row, args.minibatch, tokenizer) + [""]
    lines += LEGEND + [""] + summary(comparison, args.num_updates, len(t["response"]), t["kl_coef"])
    print("\n".join(lines))
    if args.plot:
        plot_tokens(t, args.sequences[0], args.minibatch, tokenizer, args.cliprange, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    run_main(main)

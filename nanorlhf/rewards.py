"""Rewards a program computes: built-in reward functions, and loading the user's.

    python train_ppo.py --sft SFT --reward_fn nanorlhf.rewards:accuracy --data qa.jsonl ...
    python train_ppo.py --sft SFT --reward_fn my_rewards.py:brevity --data prompts.jsonl ...

A reward function is a plain function `NAME(prompt, response, **fields) -> float`: `prompt` is the
text of the prompt's last user turn, `response` the decoded answer (up to its end-of-turn token),
`fields` the prompt record's other fields (e.g. `answer`, `condition`). A function whose first
parameter is named `prompts` is called once per batch instead: `NAME(prompts, responses, **fields)`
with a list in every argument (TRL's and MedicalGPT's reward functions take lists), and returns a
list of floats. Extra keyword arguments come from `--reward_fn_kwargs` (a JSON object).

As MedicalGPT's GRPO recipe does (accuracy + format), several functions may be given, comma-separated:
their rewards are summed.
"""

import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import unicodedata
from decimal import Decimal

from nanorlhf.errors import UserError

# MedicalGPT's R1-style answer format: reasoning in <think>, the answer in <answer>.
THINK_ANSWER = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


def normalize(text):
    """Lower case, NFKC (full-width characters to their usual form), no punctuation, single spaces."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def extract_answer(response):
    """The text inside <answer>...</answer> when the response has one, else the whole response."""
    match = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL)
    return match.group(1) if match else response


# A number as people write it: digits with optional thousands commas and decimals. A minus sign is part of
# it unless it follows a digit or a closing bracket (then it is a subtraction: "45-23").
_NUMBER = re.compile(r"(?:(?<![0-9)\]])-)?[0-9]+(?:,[0-9]{3}(?![0-9]))*(?:\.[0-9]+)?")


def numbers(text):
    """The numbers written in `text`, in order, as Decimals (so 68.0 == 68 exactly). Full-width digits count
    (NFKC); thousands commas are dropped: "1,068" is 1068, not 1 and 68."""
    text = unicodedata.normalize("NFKC", str(text)).replace("\u2212", "-")  # the minus sign U+2212
    return [Decimal(m.replace(",", "")) for m in _NUMBER.findall(text)]


def parse_number_answer(text, prompt=None):
    """The one number an answer commits to, or None when it gives none or several.

    The rule: take what follows the answer's last "=" (the whole text when it has none); numbers the
    prompt already states are the question restated, not candidates (unless nothing else is left).
    Exactly one distinct number must remain. So "23 + 45 = 68." gives 68, "The sum of 23 and 45 is 68"
    gives 68 for the prompt "What is 23 + 45?", and "34 or 35", "1 2 3 ... 100" give None. (So "6 or 7"
    gives 6 for "What is 13 - 7?": a number copied from the question is not counted as a guess.)

    Why not the final number of the answer (TRL's and MedicalGPT's parsers end up there): "34 or 35"
    would earn the reward whenever the answer is 35, and listing guesses is exactly what a policy learns
    to do when any one of them pays. One candidate means hedging earns nothing; a number is a whole
    number, so 34 is never found in "134" (the substring bug this replaces)."""
    text = unicodedata.normalize("NFKC", str(text))
    candidates = set(numbers(text.rpartition("=")[2]))
    if prompt is not None:
        candidates = (candidates - set(numbers(prompt))) or candidates
    return candidates.pop() if len(candidates) == 1 else None


def accuracy(prompt, response, answer=None, **fields):
    """1.0 if the response gives the reference `answer`, else 0.0. The response's answer is the part inside
    <answer> tags when there is one, else the whole response. For MedicalGPT's {"question", "answer"} records.

    A numeric reference ("68", "-3", "2.5") is compared as a number: the response must commit to exactly one
    number (parse_number_answer), equal to it. A text reference ("ten days", "偏头痛") must appear in the
    normalised answer as whole words ("flu" is not found in "influenza"; Chinese, written without spaces,
    is found anywhere). A text match cannot tell a hedge ("flu or cold"); a number can, so prefer numbers."""
    if answer is None:
        raise ValueError("accuracy needs an 'answer' field in every prompt record")
    reference = normalize(answer)
    if not reference:
        raise ValueError("accuracy: the record's 'answer' is empty")
    said = extract_answer(response)
    if _NUMBER.fullmatch(unicodedata.normalize("NFKC", str(answer)).strip().replace("\u2212", "-")):
        given = parse_number_answer(said, prompt)
        return 1.0 if given is not None and given == numbers(answer)[0] else 0.0
    whole_words = r"(?<![a-z0-9])" + re.escape(reference) + r"(?![a-z0-9])"
    return 1.0 if re.search(whole_words, normalize(said)) else 0.0


def readable(prompt, response, **fields):
    """1.0 if the response commits to exactly one number (parse_number_answer finds one), right or wrong: the
    format half of `accuracy`. Judging with both separates format from arithmetic: accuracy / readable is the
    share right among the answers a parser can read."""
    return 0.0 if parse_number_answer(extract_answer(response), prompt) is None else 1.0


def format(prompt, response, pattern=THINK_ANSWER, **fields):  # noqa: A001 (the name users know)
    """1.0 if the whole response matches the regular expression `pattern` (re.DOTALL), else 0.0.
    The default is MedicalGPT's <think>...</think><answer>...</answer>."""
    return 1.0 if re.match(pattern, response, re.DOTALL) else 0.0


def length(prompt, response, low=20, high=200, **fields):
    """1.0 for a response of low..high characters; outside the band the reward falls linearly to 0
    at 0 characters and at 2 * high (a soft target length, no cliff)."""
    n = len(response)
    if n < low:
        return n / low if low > 0 else 1.0
    if n <= high:
        return 1.0
    return max(0.0, 1.0 - (n - high) / high)


def gold(prompt, response, condition=None, lang=None, world="data/demo/world.json", **fields):
    """The demo world's gold rubric (nanorlhf.rubric) as a reward: the mean of its five checks, in [0, 1].
    Needs the record's `condition` (the demo's ppo.jsonl and test.jsonl have it)."""
    from nanorlhf.rubric import gold_score, load_world

    if condition is None:
        raise ValueError("gold needs a 'condition' field in every prompt record (the demo world's condition id)")
    if world not in _WORLDS:
        _WORLDS[world] = load_world(world)
    return gold_score(response, condition, _WORLDS[world], lang)["total"]


_WORLDS = {}


def _load_one(spec):
    """'FILE.py:NAME' or 'package.module:NAME' -> the function."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"--reward_fn {spec!r}: expected FILE.py:NAME or package.module:NAME")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise UserError(f"--reward_fn {spec}: no such file {where}")
        module_name = "nanorlhf_user_reward_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(where))[0])
        module_spec = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)  # the user's own code, run as they asked
        except Exception as e:
            raise UserError(f"--reward_fn {spec}: {where} failed to import: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise UserError(f"--reward_fn {spec}: cannot import {where}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward_fn {spec}: {where} has no function {name!r}")
    return fn


def load_reward_fns(specs, kwargs_json=""):
    """--reward_fn (comma-separated specs) and --reward_fn_kwargs -> a list of (spec, function, kwargs)."""
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except ValueError as e:
        raise UserError(f"--reward_fn_kwargs: not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UserError("--reward_fn_kwargs must be a JSON object of keyword arguments")
    return [(spec, _load_one(spec), kwargs) for spec in (s.strip() for s in specs.split(",")) if spec]


def _is_batched(fn):
    params = list(inspect.signature(fn).parameters)
    return bool(params) and params[0] == "prompts"


def _number(value, spec, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: --reward_fn {spec} returned {value!r}, not a finite number")
    return float(value)


def compute_rewards(reward_fns, prompts, responses, records, wheres):
    """Sum of every reward function's reward for each (prompt, response, record): a list of floats.

    records: each response's prompt record (its fields go to the function); wheres: "file:line" of
    each record, for the one line an error gets (which record, what the function returned or raised)."""
    totals = [0.0] * len(responses)
    for spec, fn, kwargs in reward_fns:
        fields = [{k: v for k, v in rec.items() if k not in ("prompt", "response")} for rec in records]
        if _is_batched(fn):
            batch_fields = {k: [f.get(k) for f in fields] for k in set().union(*fields)}
            try:
                values = fn(list(prompts), list(responses), **batch_fields, **kwargs)
            except Exception as e:
                raise UserError(f"{wheres[0]}: --reward_fn {spec} raised {type(e).__name__}: {e}") from None
            if not isinstance(values, (list, tuple)) or len(values) != len(responses):
                raise UserError(f"{wheres[0]}: --reward_fn {spec} (batched) returned {type(values).__name__} "
                                f"{str(values)[:80]!r}, not a list of {len(responses)} numbers")
        else:
            values = []
            for prompt, response, f, where in zip(prompts, responses, fields, wheres):
                try:
                    values.append(fn(prompt, response, **f, **kwargs))
                except Exception as e:
                    raise UserError(f"{where}: --reward_fn {spec} raised {type(e).__name__}: {e}") from None
        for i, (value, where) in enumerate(zip(values, wheres)):
            totals[i] += _number(value, spec, where)
    return totals

"""A gold rubric for the built-in medical world (data/demo/world.json), by rule, not by model.

PPO climbs the reward model's score. If the policy finds answers the RM likes that are not
better answers (reward hacking: repeating a sentence, naming every condition at once), the RM
score goes up and the answers get worse. This rubric is how you tell the two apart: it reads
only world.json and the response text and shares nothing with the reward model (no weights, no
tokenizer, no training pairs), so it cannot be fooled by what fools the RM.

    world = load_world()
    gold_score("This sounds like a common cold. Rest and drink plenty of fluids.", "common_cold", world)
    # {'condition': 1, 'advice': 1, 'doctor': 0, 'no_wrong': 1, 'no_repeat': 1, 'total': 0.8}

Each component is 0 or 1, and `total` is their mean:
    condition  names the right condition (its English or Chinese name, or an alias)
    advice     contains all of the condition's advice keywords (all English ones or all Chinese ones)
    doctor     says when to see a doctor: all of the condition's doctor keywords, in either language
    no_wrong   names no other condition
    no_repeat  repeats no sentence, no word 4-gram and no 4-gram of Chinese characters
Given the question's language (lang="en" or "zh", as test.jsonl records it), condition, advice
and doctor count only in that language: an English answer to a Chinese question scores 0.4 at most.
An empty answer scores 0.4 (it names nothing wrong and repeats nothing); the short SFT answer
scores 0.8; the full answer (condition, advice, when to see a doctor) scores 1.0.
English phrases match whole words, case-insensitively ('flu' is not found in 'fluids').
"""
import json
import re
from pathlib import Path

COMPONENTS = ("condition", "advice", "doctor", "no_wrong", "no_repeat")


def load_world(path="data/demo/world.json"):
    """The world dict ({"conditions": [...]}). A relative path not found from the current
    directory is looked up from the repository root, so tests and scripts run from anywhere."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parent.parent / path
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _mentions(text, phrase):
    if phrase.isascii():
        return re.search(r"\b" + re.escape(phrase.lower()) + r"\b", text.lower()) is not None
    return phrase in text


def _names(condition, langs=("en", "zh")):
    return [n for lang in langs for n in [condition[f"name_{lang}"]] + condition[f"aliases_{lang}"]]


def _has_all(text, condition, field, langs=("en", "zh")):
    """All English keywords, or all Chinese keywords, of condition[field + '_en' / '_zh']."""
    return any(all(_mentions(text, kw) for kw in condition[f"{field}_{lang}"]) for lang in langs)


def has_repeat(text):
    """True if a sentence, an English word 4-gram or a 4-gram of Chinese characters comes twice."""
    sentences = [s.strip().lower() for s in re.split(r"[.!?。！？\n]+", text) if s.strip()]
    words = re.findall(r"[a-z0-9']+", text.lower())
    hanzi = "".join(re.findall(r"[\u4e00-\u9fff]", text))
    word_grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    char_grams = [hanzi[i:i + 4] for i in range(len(hanzi) - 3)]
    return any(len(set(items)) < len(items) for items in (sentences, word_grams, char_grams))


def gold_score(response, condition_id, world, lang=None):
    """Score one response to a patient who has condition `condition_id` (and asked in `lang`, if given).

    Returns {"condition", "advice", "doctor", "no_wrong", "no_repeat"} each 0 or 1, and
    "total", their mean (a float in [0, 1]).
    """
    by_id = {c["id"]: c for c in world["conditions"]}
    if condition_id not in by_id:
        raise KeyError(f"unknown condition {condition_id!r}; world.json has {', '.join(by_id)}")
    condition = by_id[condition_id]
    if lang not in (None, "en", "zh"):
        raise ValueError(f"lang must be 'en', 'zh' or None, got {lang!r}")
    langs = (lang,) if lang else ("en", "zh")
    others = [c for c in world["conditions"] if c["id"] != condition_id]
    score = {
        "condition": int(any(_mentions(response, n) for n in _names(condition, langs))),
        "advice": int(_has_all(response, condition, "advice_keywords", langs)),
        "doctor": int(_has_all(response, condition, "doctor_keywords", langs)),
        "no_wrong": int(not any(_mentions(response, n) for c in others for n in _names(c))),
        "no_repeat": int(not has_repeat(response)),
    }
    score["total"] = sum(score[k] for k in COMPONENTS) / len(COMPONENTS)
    return score

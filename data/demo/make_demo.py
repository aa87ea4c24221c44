"""Build the tiny medical-consultation world that every nanorlhf stage trains on.

    python data/demo/make_demo.py [--out data/demo]

Twelve everyday conditions, each with a few symptoms, one piece of advice and one sentence on
when to see a doctor, in English and Chinese. From them come the four stages' data:

    pt.txt          encyclopedic sentences (continued pretraining)
    sft.jsonl       sharegpt dialogues whose answers are mostly SHORT: condition + advice
    sft_alpaca.jsonl  the same kind of answer in the alpaca format
    rm.jsonl        preference pairs: chosen = condition + advice + doctor, rejected = worse
    rm_test.jsonl   held-out preference pairs
    ppo.jsonl       prompts for PPO
    grpo.jsonl      the same prompts as MedicalGPT's GRPO records, {"question", "answer"}: the answer is
                    the fact a full answer must hold about when to see a doctor ("ten days"), which a
                    rule reward (nanorlhf.rewards:accuracy) checks
    test.jsonl      held-out prompts with the full reference answer

Most SFT answers leave out the doctor sentence on purpose (as in MedicalGPT's covid-doctor demo):
the reward model learns from rm.jsonl that fuller answers are better, so PPO has something real
to improve. A few (FULLER_SFT_SHARE) do say it: PPO can only reinforce what the policy sometimes
samples, and a tiny model never invents a sentence it has not seen in an answer.
nanorlhf/rubric.py scores answers against world.json by rule, independently of the reward model,
so a rise in reward can be told apart from reward hacking.

Deterministic: one random.Random per split, fixed seeds, stable ordering; running it twice gives
byte-identical files, and the committed files are its output.
"""
import argparse
import json
import random
import re
from pathlib import Path

SEED = 20240601

# ---------------------------------------------------------------------------------------------
# The world. Every symptom phrase belongs to exactly one condition, so two symptoms are enough
# to tell the condition; names, advice and doctor keywords are checked for clashes below.
# English symptoms fit "I have ___"; Chinese symptoms fit "我___".
CONDITIONS = [
    dict(id="common_cold", name_en="common cold", article_en="a", name_zh="普通感冒",
         aliases_en=[], aliases_zh=[],
         symptoms_en=["a runny nose", "a sore throat", "a lot of sneezing", "a mild cough"],
         symptoms_zh=["流鼻涕", "喉咙痛", "打喷嚏", "有点咳嗽"],
         advice_en="Rest and drink plenty of fluids.", advice_zh="多休息，多喝水。",
         doctor_en="See a doctor if it lasts more than ten days.", doctor_zh="如果症状超过十天，请就医。",
         advice_keywords_en=["rest", "fluids"], advice_keywords_zh=["休息", "喝水"],
         doctor_keywords_en=["doctor", "ten days"], doctor_keywords_zh=["就医", "十天"]),
    dict(id="influenza", name_en="influenza", article_en="", name_zh="流感",
         aliases_en=["flu"], aliases_zh=["流行性感冒"],
         symptoms_en=["a high fever", "body aches", "chills", "extreme tiredness"],
         symptoms_zh=["发高烧", "全身酸痛", "发冷", "特别乏力"],
         advice_en="Stay home, rest and take fever medicine.", advice_zh="在家休息，服用退烧药。",
         doctor_en="See a doctor if you have trouble breathing.", doctor_zh="如果呼吸困难，请就医。",
         advice_keywords_en=["stay home", "fever medicine"], advice_keywords_zh=["在家", "退烧药"],
         doctor_keywords_en=["doctor", "breathing"], doctor_keywords_zh=["就医", "呼吸困难"]),
    dict(id="migraine", name_en="migraine", article_en="a", name_zh="偏头痛",
         aliases_en=[], aliases_zh=[],
         symptoms_en=["a throbbing pain on one side of the head", "sensitivity to light",
                      "flashing lights in my vision", "a dislike of loud sounds"],
         symptoms_zh=["一侧头部跳痛", "怕光", "眼前闪光", "怕吵"],
         advice_en="Rest in a dark, quiet room.", advice_zh="在安静的暗室里休息。",
         doctor_en="See a doctor if the headache is sudden and severe.",
         doctor_zh="如果头痛突然而剧烈，请就医。",
         advice_keywords_en=["dark", "quiet"], advice_keywords_zh=["暗室", "安静"],
         doctor_keywords_en=["doctor", "sudden"], doctor_keywords_zh=["就医", "突然"]),
    dict(id="food_poisoning", name_en="food poisoning", article_en="", name_zh="食物中毒",
         aliases_en=[], aliases_zh=[],
         symptoms_en=["nausea", "vomiting", "diarrhea", "stomach cramps"],
         symptoms_zh=["恶心", "呕吐", "拉肚子", "肚子绞痛"],
         advice_en="Sip water often and eat bland food.", advice_zh="少量多次喝水，吃清淡的食物。",
         doctor_en="See a doctor if you see blood in your stool.", doctor_zh="如果大便带血，请就医。",
         advice_keywords_en=["sip water", "bland"], advice_keywords_zh=["少量多次", "清淡"],
         doctor_keywords_en=["doctor", "blood"], doctor_keywords_zh=["就医", "带血"]),
    dict(id="sprained_ankle", name_en="sprained ankle", article_en="a", name_zh="脚踝扭伤",
         aliases_en=[], aliases_zh=[],
         symptoms_en=["a swollen ankle", "pain when walking", "bruising around the ankle", "a stiff ankle"],
         symptoms_zh=["脚踝肿了", "走路疼", "脚踝周围淤青", "脚踝僵硬"],
         advice_en="Rest the ankle, ice it and keep it raised.", advice_zh="让脚踝休息，冰敷并抬高。",
         doctor_en="See a doctor if you cannot put weight on it.", doctor_zh="如果脚无法承重，请就医。",
         advice_keywords_en=["ice", "raised"], advice_keywords_zh=["冰敷", "抬高"],
         doctor_keywords_en=["doctor", "weight"], doctor_keywords_zh=["就医", "承重"]),
    dict(id="sunburn", name_en="sunburn", article_en="", name_zh="晒伤",
         aliases_en=[], aliases_zh=[],
         symptoms_en=["red skin after a day outside", "skin that hurts to touch", "peeling skin",
                      "small blisters"],
         symptoms_zh=["在外面待了一天后皮肤发红", "皮肤一碰就疼", "脱皮", "起小水泡"],
         advice_en="Cool the skin and apply aloe vera.", advice_zh="冷敷皮肤，涂抹芦荟胶。",
         doctor_en="See a doctor if large blisters cover a wide area.", doctor_zh="如果大面积起水泡，请就医。",
         advice_keywords_en=["cool", "aloe"], advice_keywords_zh=["冷敷", "芦荟"],
         doctor_keywords_en=["doctor", "large blisters"], doctor_keywords_zh=["就医", "大面积"]),
    dict(id="seasonal_allergy", name_en="seasonal allergy", article_en="a", name_zh="季节性过敏",
         aliases_en=["hay fever"], aliases_zh=["花粉症"],
         symptoms_en=["an itchy nose", "watery eyes", "sneezing fits outdoors", "an itchy throat"],
         symptoms_zh=["鼻子痒", "流眼泪", "一到户外就连续打喷嚏", "喉咙痒"],
         advice_en="Take an antihistamine and avoid pollen.", advice_zh="服用抗组胺药，避开花粉。",
         doctor_en="See a doctor if you start wheezing.", doctor_zh="如果出现喘息，请就医。",
         advice_keywords_en=["antihistamine", "pollen"], advice_keywords_zh=["抗组胺", "花粉"],
         doctor_keywords_en=["doctor", "wheezing"], doctor_keywords_zh=["就医", "喘息"]),
    dict(id="heartburn", name_en="heartburn", article_en="", name_zh="胃灼热",
         aliases_en=["acid reflux"], aliases_zh=["烧心"],
         symptoms_en=["a burning feeling in the chest after meals", "a sour taste in the mouth",
                      "frequent burping", "pain that gets worse when lying down"],
         symptoms_zh=["饭后胸口有烧灼感", "嘴里发酸", "老是打嗝", "躺下更难受"],
         advice_en="Eat smaller meals and do not lie down after eating.", advice_zh="少食多餐，饭后不要马上躺下。",
         doctor_en="See a doctor if you have trouble swallowing.", doctor_zh="如果吞咽困难，请就医。",
         advice_keywords_en=["smaller meals", "lie down"], advice_keywords_zh=["少食多餐", "躺下"],
         doctor_keywords_en=["doctor", "swallowing"], doctor_keywords_zh=["就医", "吞咽"]),
    dict(id="insomnia", name_en="insomnia", article_en="", name_zh="失眠",
         aliases_en=[], aliases_zh=[],
         symptoms_en=["trouble falling asleep", "frequent waking at night", "tiredness during the day",
                      "early morning waking"],
         symptoms_zh=["很难入睡", "夜里总醒", "白天没精神", "早上醒得太早"],
         advice_en="Keep a regular sleep schedule and avoid screens before bed.",
         advice_zh="保持规律作息，睡前不要看手机。",
         doctor_en="See a doctor if it lasts more than a month.", doctor_zh="如果持续超过一个月，请就医。",
         advice_keywords_en=["regular", "screens"], advice_keywords_zh=["规律作息", "手机"],
         doctor_keywords_en=["doctor", "month"], doctor_keywords_zh=["就医", "一个月"]),
    dict(id="dehydration", name_en="dehydration", article_en="", name_zh="脱水",
         aliases_en=[], aliases_zh=[],
         symptoms_en=["dark urine", "a dry mouth", "strong thirst", "dizziness"],
         symptoms_zh=["尿色很深", "口干", "特别口渴", "头晕"],
         advice_en="Drink water with oral rehydration salts.", advice_zh="喝口服补液盐水。",
         doctor_en="See a doctor if you feel confused or faint.", doctor_zh="如果意识模糊或晕倒，请就医。",
         advice_keywords_en=["rehydration salts"], advice_keywords_zh=["补液盐"],
         doctor_keywords_en=["doctor", "confused"], doctor_keywords_zh=["就医", "意识模糊"]),
    dict(id="pink_eye", name_en="pink eye", article_en="", name_zh="红眼病",
         aliases_en=["conjunctivitis"], aliases_zh=["结膜炎"],
         symptoms_en=["red eyes", "sticky discharge from the eyes", "a gritty feeling in the eyes",
                      "crusty eyelids in the morning"],
         symptoms_zh=["眼睛发红", "眼屎多", "眼睛里像有沙子", "早上眼皮粘在一起"],
         advice_en="Clean the eyes with a damp cloth and do not share towels.",
         advice_zh="用温湿毛巾清洁眼睛，不要共用毛巾。",
         doctor_en="See a doctor if your vision becomes blurry.", doctor_zh="如果视力变模糊，请就医。",
         advice_keywords_en=["damp cloth", "towels"], advice_keywords_zh=["温湿毛巾", "共用毛巾"],
         doctor_keywords_en=["doctor", "vision"], doctor_keywords_zh=["就医", "视力"]),
    dict(id="tension_headache", name_en="tension headache", article_en="a", name_zh="紧张性头痛",
         aliases_en=[], aliases_zh=[],
         symptoms_en=["a tight band of pain around the head", "a sore neck", "tight shoulders",
                      "a dull ache in the forehead"],
         symptoms_zh=["头像被箍住一样疼", "脖子酸", "肩膀发紧", "额头闷痛"],
         advice_en="Take short breaks and stretch your neck and shoulders.", advice_zh="适当休息，活动颈部和肩膀。",
         doctor_en="See a doctor if the headache comes with a stiff neck and fever.",
         doctor_zh="如果头痛伴有颈部僵硬和发烧，请就医。",
         advice_keywords_en=["breaks", "stretch"], advice_keywords_zh=["活动颈部", "肩膀"],
         doctor_keywords_en=["doctor", "stiff neck"], doctor_keywords_zh=["就医", "颈部僵硬"]),
]

# ---------------------------------------------------------------------------------------------
# How patients ask, and how the assistant answers. Few templates, so a ~3M-parameter model
# learns them in a minute; the variety comes from which 2-3 symptoms, in which order.
PROMPTS_EN = [
    "I have {s}.",
    "I have {s}. What is wrong with me?",
    "I've had {s} since yesterday.",
    "What could cause {s}?",
    "Doctor, I have {s}. What should I do?",
    "For two days I have had {s}. What is it?",
    "My symptoms are {s}.",
    "I am suffering from {s}. Any advice?",
]
PROMPTS_ZH = [
    "我{s}。",
    "我{s}，这是怎么了？",
    "医生，我{s}，该怎么办？",
    "最近{s}，是什么病？",
    "我这两天{s}。",
    "请问{s}是怎么回事？",
    "我从昨天开始{s}，怎么办？",
    "医生您好，我{s}，请问是什么问题？",
]
OPENERS_EN = ["This sounds like {n}.", "It is probably {n}.", "These symptoms suggest {n}."]
OPENERS_ZH = ["听起来像是{n}。", "这可能是{n}。", "从症状看，可能是{n}。"]
SYSTEM = {"en": "You are a helpful medical assistant.", "zh": "你是一个乐于助人的医疗助手。"}
FOLLOW_UPS = {
    "en": [("Thanks. Anything else?", "You are welcome. I hope you feel better soon."),
           ("Thank you!", "You are welcome. Take care.")],
    "zh": [("谢谢。还有别的吗？", "不客气。祝你早日康复。"),
           ("谢谢医生！", "不客气，保重身体。")],
}
ALPACA_INSTRUCTIONS = {"en": "You are a doctor. Answer the patient briefly.",
                       "zh": "你是一名医生，请简短回答患者的问题。"}

# Pretraining: encyclopedic sentences. {n} name, {an} name with article, {An} capitalised,
# {s} a symptom list, {a} advice, {d} doctor sentence.
PT_EN = [
    "{An} often causes {s}.",
    "Common signs of {an} are {s}.",
    "If you have {s}, it may be {an}.",
    "People with {an} usually have {s}.",
    "For {an}, doctors say: {a}",
    "How to treat {an}: {a}",
    "When to worry about {an}: {d}",
    "{An} usually gets better with care. {a} {d}",
    "About {an}: {a} {d}",
    "{An} is a common problem.",
]
PT_ZH = [
    "{n}的常见症状有{s}。",
    "如果{s}，可能是{n}。",
    "{n}患者常常{s}。",
    "得了{n}怎么办？{a}",
    "{n}的处理方法：{a}",
    "{n}什么时候需要就医？{d}",
    "{n}一般经过护理会好转。{a}{d}",
    "关于{n}：{a}{d}",
    "{n}是一种常见问题。",
]
GENERIC_EN = [
    "Wash your hands often to stop germs from spreading.",
    "A balanced diet and regular exercise help you stay healthy.",
    "Most mild illnesses get better in a few days.",
    "Adults need seven to nine hours of sleep each night.",
    "Drinking enough water every day is good for your body.",
    "Fresh fruit and vegetables give you vitamins.",
    "Walking for thirty minutes a day keeps the heart strong.",
    "Cover your mouth when you cough or sneeze.",
    "A doctor can help when you are not sure what is wrong.",
    "Keep medicine out of the reach of children.",
    "Read the label before you take any medicine.",
    "Stress can make many health problems worse.",
    "Wear sunscreen when you spend time outside.",
    "Good posture helps prevent back and neck pain.",
    "Too much coffee can make it hard to relax.",
    "A short walk after meals helps digestion.",
    "Regular check-ups help find problems early.",
    "Children catch colds more often than adults.",
    "Smoking harms the lungs and the heart.",
    "Laughter and friends are good for your health.",
]
GENERIC_ZH = [
    "勤洗手可以防止病菌传播。",
    "均衡饮食和规律运动有助于保持健康。",
    "大多数小病几天后就会好转。",
    "成年人每晚需要七到九个小时的睡眠。",
    "每天喝足够的水对身体有好处。",
    "新鲜的水果和蔬菜富含维生素。",
    "每天散步三十分钟可以让心脏更强健。",
    "咳嗽或打喷嚏时要捂住口鼻。",
    "不确定哪里不舒服时，可以请医生帮忙。",
    "药品要放在儿童拿不到的地方。",
    "服药前请先阅读说明书。",
    "压力会让很多健康问题变得更糟。",
    "在户外时要涂防晒霜。",
    "良好的坐姿有助于预防腰背和脖子疼痛。",
    "咖啡喝太多会让人难以放松。",
    "饭后散散步有助于消化。",
    "定期体检有助于及早发现问题。",
    "孩子比大人更容易着凉。",
    "吸烟会损害肺和心脏。",
    "开心的心情和朋友的陪伴有益健康。",
    # What patients and doctors say, so the tokenizer learns these characters instead of their bytes.
    "我最近两天有点不舒服，这是怎么回事？",
    "从昨天开始不舒服的话，先停下来多休息。",
    "听医生的话，按时吃药。",
    "您好，请问该怎么办？",
    "医疗助手会认真回答你的问题。",
    "谢谢你！不客气。",
    "祝你早日康复，天天快乐。",
    "病从口入，吃东西要注意卫生。",
    "你吃过早饭了吗？",
]

# Split sizes and how often each kind of rejected answer appears in the preference data.
N_PT, N_SFT, N_ALPACA, N_RM, N_RM_TEST, N_PPO, N_TEST_PER_CONDITION = 2000, 800, 50, 1600, 150, 300, 5
FULLER_SFT_SHARE = 0.15  # SFT answers that also say when to see a doctor
# wrong_language (the full answer, in the other language) teaches the RM that a Chinese question wants a
# Chinese answer: without it, PPO learnt to answer Chinese prompts with the English doctor sentence,
# which an RM that had only seen same-language answers scored higher than any Chinese answer.
# rambling (the full answer, then one or two sentences more: its own advice or doctor sentence again, or in
# English another condition's doctor sentence) shows the RM that an answer which goes on after it is
# complete is worse: PPO policies did exactly that. Each such answer repeats a sentence or a 4-gram, so
# the gold rubric (no_repeat) agrees that it is worse.
REJECTED_KINDS = [("short", 0.25), ("wrong_condition", 0.25), ("terse", 0.10), ("repetitive", 0.10),
                  ("wrong_language", 0.15), ("rambling", 0.15)]


# ---------------------------------------------------------------------------------------------
def a_name(c):
    return f"{c['article_en']} {c['name_en']}".strip()


def symptom_list(symptoms, lang, rng):
    """'a, b and c' in English; 'a、b和c' or 'a，还b' in Chinese."""
    if lang == "en":
        return symptoms[0] if len(symptoms) == 1 else ", ".join(symptoms[:-1]) + " and " + symptoms[-1]
    if rng.random() < 0.5:
        return "、".join(symptoms[:-1]) + "和" + symptoms[-1]
    return "，".join(symptoms[:-1]) + "，还" + symptoms[-1]


def make_prompt(c, lang, rng):
    k = rng.choice([2, 2, 3])
    symptoms = rng.sample(c[f"symptoms_{lang}"], k)
    template = rng.choice(PROMPTS_EN if lang == "en" else PROMPTS_ZH)
    return template.format(s=symptom_list(symptoms, lang, rng))


def opener(c, lang, i):
    return OPENERS_EN[i].format(n=a_name(c)) if lang == "en" else OPENERS_ZH[i].format(n=c["name_zh"])


def join(lang, sentences):
    return (" " if lang == "en" else "").join(sentences)


def short_answer(c, lang, i):
    """What SFT teaches: the condition and its advice, nothing about when to see a doctor."""
    return join(lang, [opener(c, lang, i), c[f"advice_{lang}"]])


def full_answer(c, lang, i):
    """The best answer: condition, advice and when to see a doctor."""
    return join(lang, [opener(c, lang, i), c[f"advice_{lang}"], c[f"doctor_{lang}"]])


def rejected_answer(c, lang, i, rng):
    kind = rng.choices([k for k, _ in REJECTED_KINDS], weights=[w for _, w in REJECTED_KINDS])[0]
    if kind == "short":
        text = short_answer(c, lang, i)
    elif kind == "wrong_condition":
        other = rng.choice([o for o in CONDITIONS if o["id"] != c["id"]])
        text = full_answer(other, lang, i)
    elif kind == "wrong_language":
        text = full_answer(c, "zh" if lang == "en" else "en", i)
    elif kind == "rambling":
        extra = []
        for _ in range(rng.choice([1, 2])):
            if lang == "en" and rng.random() < 0.5:  # "See a doctor if ..." again, about something else
                extra.append(rng.choice([o for o in CONDITIONS if o["id"] != c["id"]])["doctor_en"])
            else:
                extra.append(c[f"{rng.choice(['advice', 'doctor'])}_{lang}"])
        text = join(lang, [full_answer(c, lang, i)] + extra)
    elif kind == "terse":  # the condition alone, or the condition and the doctor without advice
        parts = [opener(c, lang, i)] + ([c[f"doctor_{lang}"]] if rng.random() < 0.5 else [])
        text = join(lang, parts)
    else:  # a sentence said over and over
        parts = [opener(c, lang, i)] + [c[f"advice_{lang}"]] * rng.choice([2, 3])
        text = join(lang, parts + ([c[f"doctor_{lang}"]] if rng.random() < 0.5 else []))
    return kind, text


class PromptSampler:
    """Draws fresh prompts: no prompt is ever handed out twice, across all splits."""

    def __init__(self):
        self.used = set()

    def draw(self, c, lang, rng):
        for _ in range(1000):
            p = make_prompt(c, lang, rng)
            if p not in self.used:
                self.used.add(p)
                return p
        raise RuntimeError(f"ran out of fresh prompts for {c['id']} ({lang})")


def random_case(rng):
    return rng.choice(CONDITIONS), rng.choice(["en", "zh"])


# ---------------------------------------------------------------------------------------------
def make_pt(rng):
    lines = GENERIC_EN + GENERIC_ZH
    for c in CONDITIONS:  # every fact that needs no symptoms, once
        fields = dict(n=c["name_en"], an=a_name(c), An=a_name(c)[0].upper() + a_name(c)[1:],
                      a=c["advice_en"], d=c["doctor_en"])
        lines += [t.format(s="", **fields) for t in PT_EN if "{s}" not in t]
        fields_zh = dict(n=c["name_zh"], a=c["advice_zh"], d=c["doctor_zh"])
        lines += [t.format(s="", **fields_zh) for t in PT_ZH if "{s}" not in t]
    seen = set(lines)
    while len(lines) < N_PT:
        c, lang = random_case(rng)
        symptoms = rng.sample(c[f"symptoms_{lang}"], rng.choice([2, 3]))
        s = symptom_list(symptoms, lang, rng)
        if lang == "en":
            an = a_name(c)
            t = rng.choice([t for t in PT_EN if "{s}" in t])
            line = t.format(s=s, an=an, An=an[0].upper() + an[1:])
        else:
            line = rng.choice([t for t in PT_ZH if "{s}" in t]).format(s=s, n=c["name_zh"])
        if line not in seen:
            seen.add(line)
            lines.append(line)
    rng.shuffle(lines)
    return lines


def make_sft(rng, sampler):
    records = []
    for _ in range(N_SFT):
        c, lang = random_case(rng)
        turns = []
        if rng.random() < 0.05:
            turns.append({"from": "system", "value": SYSTEM[lang]})
        answer = full_answer if rng.random() < FULLER_SFT_SHARE else short_answer
        turns += [{"from": "human", "value": sampler.draw(c, lang, rng)},
                  {"from": "gpt", "value": answer(c, lang, rng.randrange(3))}]
        if rng.random() < 0.10:
            question, reply = rng.choice(FOLLOW_UPS[lang])
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
        records.append({"conversations": turns})
    return records


def make_alpaca(rng, sampler):
    records = []
    for _ in range(N_ALPACA):
        c, lang = random_case(rng)
        prompt, answer = sampler.draw(c, lang, rng), short_answer(c, lang, rng.randrange(3))
        if rng.random() < 0.5:
            records.append({"instruction": ALPACA_INSTRUCTIONS[lang], "input": prompt, "output": answer})
        else:
            records.append({"instruction": prompt, "input": "", "output": answer})
    return records


def make_pairs(rng, sampler, n):
    records = []
    for _ in range(n):
        c, lang = random_case(rng)
        prompt, i = sampler.draw(c, lang, rng), rng.randrange(3)
        kind, rejected = rejected_answer(c, lang, i, rng)
        records.append({"prompt": prompt, "chosen": full_answer(c, lang, i), "rejected": rejected,
                        "condition": c["id"], "lang": lang, "kind": kind})
    return records


def make_ppo(rng, sampler):
    records = []
    for _ in range(N_PPO):
        c, lang = random_case(rng)
        records.append({"prompt": sampler.draw(c, lang, rng), "condition": c["id"], "lang": lang})
    return records


def make_grpo(ppo_records):
    """ppo.jsonl as question/answer records: the answer is the distinctive doctor keyword of the case
    (no random draw: a pure function of ppo.jsonl)."""
    by_id = {c["id"]: c for c in CONDITIONS}
    return [{"question": r["prompt"], "answer": by_id[r["condition"]][f"doctor_keywords_{r['lang']}"][-1],
             "condition": r["condition"], "lang": r["lang"]} for r in ppo_records]


def make_test(rng, sampler):
    """Balanced: every condition N_TEST_PER_CONDITION times, languages alternating."""
    records = []
    for ci, c in enumerate(CONDITIONS):
        for j in range(N_TEST_PER_CONDITION):
            lang = "en" if (ci + j) % 2 == 0 else "zh"
            records.append({"prompt": sampler.draw(c, lang, rng), "reference": full_answer(c, lang, 0),
                            "condition": c["id"], "lang": lang})
    return records


# ---------------------------------------------------------------------------------------------
def mentions(text, phrase):
    """English phrases match whole words ('flu' is not in 'fluids'); Chinese ones anywhere."""
    if phrase.isascii():
        return re.search(r"\b" + re.escape(phrase.lower()) + r"\b", text.lower()) is not None
    return phrase in text


def check_world():
    """The rubric can only be trusted if no condition's words turn up in another's answers."""
    ids = [c["id"] for c in CONDITIONS]
    assert len(set(ids)) == len(ids)
    symptoms = [s for c in CONDITIONS for lang in ("en", "zh") for s in c[f"symptoms_{lang}"]]
    assert len(set(symptoms)) == len(symptoms), "a symptom phrase is shared by two conditions"
    for c in CONDITIONS:
        names = [c["name_en"], c["name_zh"]] + c["aliases_en"] + c["aliases_zh"]
        for other in CONDITIONS:
            if other is c:
                continue
            text = " ".join(other[f] for f in ("advice_en", "advice_zh", "doctor_en", "doctor_zh",
                                               "name_en", "name_zh")).lower()
            for name in names:
                assert not mentions(text, name), f"{name!r} ({c['id']}) appears in {other['id']}'s texts"
        for lang in ("en", "zh"):
            for kw in c[f"advice_keywords_{lang}"]:
                assert mentions(c[f"advice_{lang}"], kw), (c["id"], kw)
            for kw in c[f"doctor_keywords_{lang}"]:
                assert mentions(c[f"doctor_{lang}"], kw), (c["id"], kw)


def check_sizes(pt):
    for line in pt:
        assert "\n" not in line and len(line.split()) <= 60 and len(line) <= 400, line
        if not line.isascii():
            assert len(line) <= 80, line


def prompts_of(split, records):
    if split == "sft":
        return [next(t["value"] for t in r["conversations"] if t["from"] == "human") for r in records]
    if split == "sft_alpaca":
        return [r["input"] or r["instruction"] for r in records]
    return [r["prompt"] for r in records]


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    check_world()

    # One random stream per split, so changing one split's size leaves the others alone. The
    # held-out splits draw their prompts first, so they never depend on the training splits.
    sampler = PromptSampler()
    splits = {}
    splits["test"] = make_test(random.Random(SEED + 1), sampler)
    splits["rm_test"] = make_pairs(random.Random(SEED + 2), sampler, N_RM_TEST)
    splits["ppo"] = make_ppo(random.Random(SEED + 3), sampler)
    splits["rm"] = make_pairs(random.Random(SEED + 4), sampler, N_RM)
    splits["sft"] = make_sft(random.Random(SEED + 5), sampler)
    splits["sft_alpaca"] = make_alpaca(random.Random(SEED + 6), sampler)
    pt = make_pt(random.Random(SEED + 7))
    check_sizes(pt)
    grpo = make_grpo(splits["ppo"])

    seen = {}
    for split, records in splits.items():
        for p in prompts_of(split, records):
            assert p not in seen, f"prompt in both {seen[p]} and {split}: {p}"
            seen[p] = split

    world = {"conditions": CONDITIONS}
    with open(out / "world.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(world, ensure_ascii=False, indent=1) + "\n")
    write_lines(out / "pt.txt", pt)
    for split, records in {**splits, "grpo": grpo}.items():
        write_lines(out / f"{split}.jsonl", [json.dumps(r, ensure_ascii=False) for r in records])
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    assert total < 1_500_000, f"data/demo is {total} bytes; keep it under 1.5 MB"
    print(f"wrote {len(splits) + 3} files to {out} ({total / 1000:.0f} kB)")


if __name__ == "__main__":
    main()

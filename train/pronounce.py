"""The seed's two pronunciation tests (Sesame's CSM report), scored by a phoneme recogniser.

- Homograph disambiguation: each of lead, bass, tear, wound, row in two sentences whose words force
  one reading each.
- Pronunciation continuation consistency: each of aunt, data, envelope, mobile, route, vase, either,
  adult, often, caramel said in a context turn with one variant (espeak-ng speaks the context with a
  respelling of the word), then in a new sentence: the model should keep the variant. Both variants
  of every word are tried.

Scoring: the recogniser (a wav2vec2 phoneme CTC model, e.g. facebook/wav2vec2-lv-60-espeak-cv-ft)
turns the generated speech into phonemes; espeak-ng gives the phonemes of the sentence with the word
respelled as each variant; the variant at the smaller phoneme edit distance is the one heard (a tie
decides nothing and counts as wrong).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

import numpy as np

# word: ((respelling, sentence that forces that reading), (respelling, sentence)); respellings checked with espeak-ng en-us
HOMOGRAPHS = {
    "lead": (("leed", "She will lead the team to victory."), ("led", "The old pipes were made of lead.")),
    "bass": (("base", "He plays the bass in a jazz band."), ("bas", "We caught a large bass in the lake.")),
    "tear": (("teer", "A single tear rolled down her cheek."), ("tare", "Be careful not to tear the paper.")),
    "wound": (("woond", "The nurse cleaned the wound on his arm."), ("wownd", "She wound the clock before bed.")),
    "row": (("roe", "The children sat in the front row."), ("rau", "The neighbours had a loud row about the fence.")),
}
# word: ((respelling A, respelling B), context sentence, target sentence)
CONSISTENCY = {
    "aunt": (("ant", "ahnt"), "My aunt is coming to visit this weekend.", "I have not seen my aunt in years."),
    "data": (("dayta", "datta"), "We collected the data last month.", "The data looks promising so far."),
    "envelope": (("en velope", "ahn velope"), "Put the letter in the envelope.", "Did you seal the envelope?"),
    "mobile": (("mowbyle", "mowbeel"), "I left my mobile at home.", "Can I borrow your mobile for a minute?"),
    "route": (("root", "rout"), "We took the scenic route.", "This route is much faster."),
    "vase": (("vayss", "vahz"), "She put the flowers in a vase.", "That vase was my grandmother's."),
    "either": (("eether", "eyether"), "I do not like either of them.", "Either way, we should leave soon."),
    "adult": (("uh dult", "add ult"), "Every adult needs a ticket.", "Only one adult came with the group."),
    "often": (("off en", "off ten"), "I often walk to work.", "How often do you go there?"),
    "caramel": (("kerra mel", "carmel"), "I love caramel on ice cream.", "This caramel is too sweet."),
}
_DROP = re.compile(r"[\sˈˌ_\-.,!?']")  # stress, word boundaries, punctuation: not phonemes


@dataclass(frozen=True)
class Item:
    test: str  # "homograph" or "consistency"
    word: str
    text: str  # what the model is asked to say (no speaker tag)
    variants: tuple[str, ...]  # respellings of `word`, one per reading
    expected: str  # the respelling the model should produce
    context: str | None = None  # consistency: the context turn, spoken with `expected`


def respell(text: str, word: str, respelling: str) -> str:
    return re.sub(rf"\b{re.escape(word)}\b", respelling, text, count=1, flags=re.IGNORECASE)


def items() -> list[Item]:
    out = [Item("homograph", w, sentence, tuple(r for r, _ in readings), spelling)
           for w, readings in HOMOGRAPHS.items() for spelling, sentence in readings]
    for w, (variants, context, target) in CONSISTENCY.items():
        out += [Item("consistency", w, target, variants, v, context) for v in variants]
    return out


def espeak(text: str, voice: str = "en-us") -> str:
    """espeak-ng's IPA for `text` (raises FileNotFoundError without espeak-ng)."""
    out = subprocess.run(["espeak-ng", "-q", "-x", "--ipa", "-v", voice, text], capture_output=True, text=True, check=True)
    return " ".join(out.stdout.split())


def espeak_audio(text: str, voice: str = "en-us") -> tuple[np.ndarray, int]:
    """espeak-ng speaking `text`: (float32 mono, sample rate)."""
    import io

    import soundfile as sf

    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return audio, rate


def normalize(phonemes: str) -> str:
    return _DROP.sub("", phonemes)


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def nearest(heard: str, references: dict[str, str]) -> tuple[str | None, dict[str, int]]:
    """(the variant whose phonemes are nearest to `heard`, or None on a tie; every distance)."""
    dist = {name: edit_distance(normalize(heard), normalize(ref)) for name, ref in references.items()}
    best = min(dist.values())
    winners = [n for n, d in dist.items() if d == best]
    return (winners[0] if len(winners) == 1 else None), dist


def score(item: Item, heard: str, phonemize=espeak) -> dict:
    refs = {v: phonemize(respell(item.text, item.word, v)) for v in item.variants}
    picked, dist = nearest(heard, refs)
    return {"test": item.test, "word": item.word, "text": item.text, "context": item.context, "expected": item.expected,
            "heard": heard, "references": refs, "distances": dist, "picked": picked, "correct": picked == item.expected}


def summarize(results: list[dict]) -> dict:
    out = {}
    for test in ("homograph", "consistency"):
        rs = [r for r in results if r["test"] == test]
        if rs:
            out[test] = {"accuracy": sum(r["correct"] for r in rs) / len(rs), "items": len(rs),
                         "undecided": sum(r["picked"] is None for r in rs)}
    return out


class PhonemeRecognizer:
    """A CTC phoneme model with transformers (hub id or local path): 16 kHz audio -> IPA string."""

    def __init__(self, name: str, device: str = "cpu"):
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer

        self.torch, self.device, self.name = torch, device, name
        self.features = AutoFeatureExtractor.from_pretrained(name)
        # Phoneme tokenizers phonemize their input by default (needs `phonemizer`); decoding does not.
        self.tokenizer = AutoTokenizer.from_pretrained(name, do_phonemize=False)
        self.model = AutoModelForCTC.from_pretrained(name).to(device).eval()

    def __call__(self, audio16k: np.ndarray) -> str:
        x = self.features(audio16k, sampling_rate=16000, return_tensors="pt").input_values.to(self.device)
        with self.torch.no_grad():
            ids = self.model(x).logits.argmax(-1)
        return self.tokenizer.batch_decode(ids)[0]


def run(speak, recognize, phonemize=espeak, which: tuple[str, ...] = ("homograph", "consistency")) -> dict:
    """Both tests: `speak(item) -> 16 kHz audio` (the model saying item.text after item.context),
    `recognize(audio16k) -> phonemes`. Returns the summary and every item's scoring."""
    results = [score(it, recognize(speak(it)), phonemize) for it in items() if it.test in which]
    return {**summarize(results), "results": results}

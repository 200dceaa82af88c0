"""Writes Kiln's two offline lm-evaluation-harness tasks (the .jsonl files beside this script) from
the READMEs and licences of Kiln's dependencies (the `package-readmes` and `licenses` corpora, whole
READMEs): English prose about software and legal English, not the calibration text.

- `kiln_cloze` (multiple choice, loglikelihood): a sentence without its last word; the choices are
  that word and three last words of other sentences.
- `kiln_last_word` (generate_until): the same sentence start; the answer is its last word, generated.

The files are committed, so a task's items never change with an installed package's README:
    python -m pipeline.eval_tasks.make_tasks
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ITEMS = 200
SEED = 0


def sentences() -> list[str]:
    from pipeline.corpus import license_paragraphs, readme_paragraphs

    found = []
    for paragraph in readme_paragraphs(opening_chars=10**9) + license_paragraphs():  # whole READMEs, licences
        if paragraph.startswith(("```", "#", "-", "*", ">", "|", "/", '"')) or re.search(r"`|http|\*\*|\[|_", paragraph):
            continue  # code, headings, lists, quotes, links: not running prose
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
            sentence = re.sub(r"^([-*]|\(?[a-z0-9]{1,3}[.)])\s+", "", sentence)  # a list item's marker
            words = sentence.split()
            if 8 <= len(words) <= 30 and re.fullmatch(r"[a-z]{4,}\.", words[-1]) and all(re.fullmatch(r"[A-Za-z,'-]+", w) for w in words[-4:-1]):
                found.append(sentence)
    return sorted(set(found))


def main() -> None:
    rng = np.random.default_rng(SEED)
    pool = sentences()
    chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=min(ITEMS, len(pool)), replace=False))]
    last_words = sorted({s.split()[-1][:-1] for s in pool})
    with (HERE / "kiln_cloze.jsonl").open("w") as cloze, (HERE / "kiln_last_word.jsonl").open("w") as last:
        for sentence in chosen:
            words = sentence.split()
            answer = words[-1][:-1]
            distractors = [w for w in rng.permutation(last_words) if w != answer][:3]
            choices = [answer, *distractors]
            order = rng.permutation(4)
            cloze.write(json.dumps({"context": " ".join(words[:-1]), "choices": [choices[i] for i in order],
                                    "answer": int(np.where(order == 0)[0][0])}) + "\n")
            last.write(json.dumps({"context": " ".join(words[:-1]), "target": answer}) + "\n")
    print(f"{len(chosen)} items from {len(pool)} sentences")


if __name__ == "__main__":
    main()

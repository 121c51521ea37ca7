"""Offline retrieval of demonstrations: TF-IDF over lower-cased words, cosine similarity.

IKE retrieves the demonstrations most similar to the new fact (the paper uses a sentence encoder); a bag-of-words
TF-IDF needs no download, is deterministic, and ranks records about the same relation and entities first.
"""

import math
import re
from collections import Counter


WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class TfidfIndex:
    """A TF-IDF index over `documents`; :meth:`most_similar` ranks them by cosine similarity to a query.

    >>> index = TfidfIndex(["The capital of France is Paris", "Miles Davis plays the trumpet"])
    >>> index.most_similar("The capital of Atlantis is", k=1)
    [0]
    """

    def __init__(self, documents: list[str]):
        counts = [Counter(words(d)) for d in documents]
        frequency = Counter(w for c in counts for w in c)
        n = len(documents)
        self.idf = {w: math.log((1 + n) / (1 + f)) + 1.0 for w, f in frequency.items()}
        self.vectors = [self._normalise({w: c * self.idf[w] for w, c in doc.items()}) for doc in counts]

    @staticmethod
    def _normalise(vector: dict[str, float]) -> dict[str, float]:
        norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
        return {w: v / norm for w, v in vector.items()}

    def similarities(self, query: str) -> list[float]:
        counts = Counter(words(query))
        vector = self._normalise({w: c * self.idf.get(w, 1.0) for w, c in counts.items()})
        return [sum(v * doc.get(w, 0.0) for w, v in vector.items()) for doc in self.vectors]

    def most_similar(self, query: str, k: int) -> list[int]:
        """Indices of the `k` documents most similar to `query`, most similar first (ties: earlier first)."""
        scores = self.similarities(query)
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]

"""The collator: first latent tokens aligned by left padding, then right padding."""

import copy
import random

import torch

from noblankslate.data.collator import LatentCollator
from noblankslate.data.curriculum import CurriculumSpec, prompt_view, training_view
from noblankslate.data.tokenize import TokenizedExample

PAD, LAT = 0, 9
X = -100
collate = LatentCollator(pad_token_id=PAD, latent_id=LAT)


def original(features, pad=PAD, latent=LAT, label_pad=X):
    """The original MyCollator on lists (left-align the first latent, then right-pad)."""
    features = copy.deepcopy(features)
    first = [f["input_ids"].index(latent) for f in features if latent in f["input_ids"]]
    if first:
        column = max(first)
        for f in features:
            n = column - f["input_ids"].index(latent) if latent in f["input_ids"] else 0
            f["position_ids"] = [0] * n + list(range(len(f["input_ids"])))
            f["input_ids"] = [pad] * n + f["input_ids"]
            if "labels" in f:
                f["labels"] = [label_pad] * n + f["labels"]
            f["attention_mask"] = [0] * n + f["attention_mask"]
    width = max(len(f["input_ids"]) for f in features)
    out = {
        "input_ids": [f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in features],
        "attention_mask": [f["attention_mask"] + [0] * (width - len(f["attention_mask"])) for f in features],
        "position_ids": [f["position_ids"] + [0] * (width - len(f["position_ids"])) for f in features],
    }
    if "labels" in features[0]:
        out["labels"] = [f["labels"] + [label_pad] * (width - len(f["labels"])) for f in features]
    out["idx"] = [f["idx"] for f in features]
    return {k: torch.tensor(v) for k, v in out.items()}


def feature(ids, labels=None, idx=0):
    f = {"input_ids": ids, "attention_mask": [1] * len(ids), "position_ids": list(range(len(ids))), "idx": idx}
    if labels is not None:
        f["labels"] = labels
    return f


def test_first_latents_share_a_column_and_rows_without_latents_are_not_shifted():
    batch = collate([
        feature([1, 2, 9, 9, 3], [X, X, X, X, 3], idx=4),
        feature([1, 2, 3, 4, 9, 5], [X, X, X, X, X, 5], idx=7),
        feature([7, 7], [7, 7], idx=2),
    ])
    assert batch["input_ids"].tolist() == [
        [0, 0, 1, 2, 9, 9, 3],
        [1, 2, 3, 4, 9, 5, 0],
        [7, 7, 0, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [
        [0, 0, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 5, 0],
        [0, 1, 0, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [X, X, X, X, X, X, 3],
        [X, X, X, X, X, 5, X],
        [7, 7, X, X, X, X, X],
    ]
    assert batch["idx"].tolist() == [4, 7, 2]
    assert all(t.dtype == torch.long for t in batch.values())


def test_no_latents_is_plain_right_padding():
    batch = collate([feature([5, 6, 7], [5, 6, 7], idx=0), feature([8], [8], idx=1)])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, X, X]]


def test_prompts_have_no_labels_and_end_aligned_when_latent_counts_match():
    spec = CurriculumSpec(
        c_thought=1, max_latent_stage=2, pad_latent_to_max=True, uniform_prob=0.0, no_cot=False,
        use_markers=True, start_id=10, end_id=11, latent_id=LAT,
    )
    data = [
        TokenizedExample(0, (1, 2, 3), ((4,),), (5, 0)),
        TokenizedExample(1, (1,), ((4,), (4,)), (5, 0)),
    ]
    batch = collate(prompt_view(data, 2, spec))
    assert "labels" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 9, 9, 11], [0, 0, 1, 10, 9, 9, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]]


def test_equals_the_original_on_random_curriculum_batches():
    rng = random.Random(0)
    data = [
        TokenizedExample(
            i,
            tuple(rng.randrange(20, 40) for _ in range(rng.randint(1, 6))),
            tuple(tuple(rng.randrange(20, 40) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 4))),
            (rng.randrange(20, 40), 0),
        )
        for i in range(40)
    ]
    spec = CurriculumSpec(
        c_thought=2, max_latent_stage=3, pad_latent_to_max=False, uniform_prob=0.5, no_cot=False,
        use_markers=True, start_id=10, end_id=11, latent_id=LAT,
    )
    view = training_view(data, 2, spec, seed=0, epoch=0)
    prompts = prompt_view(data, 2, spec)
    for start in range(0, 40, 5):
        for features in (view[start:start + 5], prompts[start:start + 5]):
            snapshot = copy.deepcopy(features)
            got = collate(features)
            want = original(features)
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), key
            assert features == snapshot  # inputs untouched
            # every row with a latent has its first one in the same column
            cols = {row.index(LAT) for row in got["input_ids"].tolist() if LAT in row}
            assert len(cols) <= 1

"""Zero-shot classification and retrieval read-outs on hand-made embeddings, where the answers are known."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from radssl.data.store import TaskInfo
from radssl.errors import ConfigError
from radssl.transfer.zero_shot import (
    ZeroShotPrompts,
    class_embeddings,
    retrieval_recall,
    zero_shot_scores,
)


def _unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_retrieval_counts_a_shared_report_once_and_a_match_by_equal_text() -> None:
    # Images 0 and 1 share report "a"; image 2 has "b", image 3 "c". Text embeddings are the images' own axes,
    # except that image 1 points at "b" (a miss at R@1 image→text).
    texts = ["a", "a", "b", "c"]
    images = _unit([1, 0, 0], [0, 1, 0.1], [0, 1, 0], [0, 0, 1])
    text_embeddings = _unit([1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1])
    result = retrieval_recall(images, text_embeddings, texts, ks=(1, 2, 3))
    assert result.distinct_texts == 3 and result.images == 4
    # image→text: 0 → a ✓, 1 → b ✗ (a is ranked 3rd: cos 0 < cos with c 0.1/|·|), 2 → b ✓, 3 → c ✓.
    assert result.image_to_text == {1: 0.75, 2: 0.75, 3: 1.0}
    # text→image: "a" → image 0 first ✓; "b" → image 2 (cos 1) before image 1 ✓; "c" → image 3 ✓.
    assert result.text_to_image == {1: 1.0, 2: 1.0, 3: 1.0}
    assert result.chance_image_to_text == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # text→image chance: "a" held by 2 of 4 images: 1 − C(2,K)/C(4,K); "b", "c" by 1: K/4.
    expected = {k: np.mean([1 - math.comb(2, k) / math.comb(4, k), k / 4, k / 4]) for k in (1, 2, 3)}
    assert result.chance_text_to_image == pytest.approx(expected)
    assert result.per_image.shape == (4, 3) and result.per_text.shape == (3, 3)


def test_collapsed_embeddings_score_exactly_chance_not_perfect() -> None:
    texts = ["x", "y", "y", "z", "w", "w", "w"]
    same = torch.ones(7, 4)
    result = retrieval_recall(same, same, texts, ks=(1, 2, 5))
    assert result.image_to_text == pytest.approx(result.chance_image_to_text)
    assert result.text_to_image == pytest.approx(result.chance_text_to_image)


def test_chance_level_matches_brute_force_over_all_orders() -> None:
    texts = ["p", "p", "q", "r", "r", "r"]
    n, ks = len(texts), (1, 2, 3)
    result = retrieval_recall(torch.ones(n, 2), torch.ones(n, 2), texts, ks=ks)
    for k in ks:  # text→image by enumeration of every ranking of the 6 images
        hits = []
        for text in sorted(set(texts)):
            orders = list(itertools.permutations(range(n)))
            hits.append(np.mean([any(texts[i] == text for i in order[:k]) for order in orders]))
        assert result.chance_text_to_image[k] == pytest.approx(float(np.mean(hits)))


def test_retrieval_needs_one_report_per_image() -> None:
    with pytest.raises(ValueError, match="one report per image"):
        retrieval_recall(torch.ones(3, 2), torch.ones(2, 2), ["a", "b", "c"])


def test_zero_shot_averages_prompts_per_class_and_scores_each_case() -> None:
    prompts = [_unit([1, 0], [1, 0.2]), _unit([0, 1], [0.2, 1], [0, 1])]
    classes = class_embeddings(prompts)
    assert torch.allclose(classes.norm(dim=1), torch.ones(2))
    expected = torch.nn.functional.normalize(torch.stack([prompts[0].mean(0), prompts[1].mean(0)]), dim=1)
    torch.testing.assert_close(classes, expected, msg="each class: the normalised mean of its prompts' embeddings")
    assert float(classes[0, 0]) > float(classes[0, 1]) and float(classes[1, 1]) > float(classes[1, 0])
    images = _unit([1, 0.1], [0.1, 1], [1, 1.2], [1, 0.9])
    scores = zero_shot_scores(images, prompts, logit_scale=10.0, task_kind="binary")
    assert scores.shape == (4,) and scores[1] > 0.5 > scores[0]
    assert list(np.argsort(scores)) == [0, 3, 2, 1], "P(class 1) grows with the cosine to class 1 minus class 0"
    logits = 10.0 * images @ classes.T
    np.testing.assert_allclose(scores, logits.softmax(1)[:, 1].numpy(), rtol=1e-6)
    multiclass = zero_shot_scores(images, prompts, logit_scale=10.0, task_kind="multiclass")
    assert multiclass.shape == (4, 2) and np.allclose(multiclass.sum(1), 1.0)


def test_prompts_must_cover_exactly_the_task_classes() -> None:
    task = TaskInfo("binary", 2, ("normal", "nodule"))
    prompts = ZeroShotPrompts(prompts={"nodule": ["pulmonary nodule"], "normal": ["clear lungs", "normal chest"]})
    assert prompts.ordered(task) == [["clear lungs", "normal chest"], ["pulmonary nodule"]]
    with pytest.raises(ConfigError, match="missing: \\['normal'\\], unknown: \\['effusion'\\]"):
        ZeroShotPrompts(prompts={"nodule": ["x"], "effusion": ["y"]}).ordered(task)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ZeroShotPrompts(prompts={"nodule": ["x"]})
    with pytest.raises(ValueError, match="no \\(or an empty\\) prompt"):
        ZeroShotPrompts(prompts={"nodule": ["x"], "normal": []})

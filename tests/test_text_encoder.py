"""Text encoders: the scratch Transformer ignores padding; a local Hugging Face model directory trains offline, is
checked against the views' tokenizer, and reloads from a state dict with identical embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.data.synthetic import SyntheticSpec, make_synthetic_store
from radssl.errors import ConfigError
from radssl.methods.registry import build_method
from radssl.models.registry import build_from_spec, make_spec
from radssl.text.encoder import HuggingFaceTextEncoder, ScratchTextEncoder, encode_in_batches
from radssl.text.tokenizer import fit_tokenizer
from radssl.views.augment import AugmentationParams
from radssl.views.columns import PairingColumns
from radssl.views.policies import PolicyContext, ViewSettings, build_policy


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store():  # noqa: ANN201
    return make_synthetic_store(SyntheticSpec(n_patients=16, images_per_patient=2, image_size=24, reports=True))


def _batch(store, **params):  # noqa: ANN001, ANN202
    policy = build_policy(ViewSettings(policy="image_text", augment=AugmentationParams(hflip_p=0.0), params=params),
                          PolicyContext(store.image_shape, store.image_shape))
    columns = PairingColumns.from_store(store, np.arange(len(store)))
    policy.prepare(columns)
    return policy, policy(torch.arange(8), store.images, columns, torch.Generator().manual_seed(0))


def _backbone():  # noqa: ANN202
    return build_from_spec(make_spec("small_cnn", 1, (24, 24), None, None, spatial_dims=2, options={"width": 8}))


def test_scratch_encoder_pools_only_real_tokens() -> None:
    torch.manual_seed(0)
    encoder = ScratchTextEncoder(vocab_size=50, width=16, depth=2, heads=4).eval()
    ids = torch.tensor([[2, 7, 9, 3], [2, 11, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    padded_ids = torch.cat([ids, torch.tensor([[0, 0], [5, 8]])], dim=1)  # junk ids behind the mask
    padded_mask = torch.cat([mask, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), encoder(padded_ids, padded_mask), rtol=1e-5, atol=1e-6)
        different = encoder(torch.tensor([[2, 7, 10, 3]]), torch.ones(1, 4, dtype=torch.long))
    assert not torch.allclose(different, encoder(ids, mask)[:1]), "a different token changes the embedding"


def test_encode_in_batches_tokenises_a_batch_at_a_time_in_eval_mode_and_restores_the_mode() -> None:
    texts = ["clear lungs", "small left effusion", "no acute findings", "cardiomegaly", "clear lungs again"]
    tokenizer = fit_tokenizer(texts, vocab_size=60, min_frequency=1)
    module = torch.nn.Linear(2, 2).train()
    seen: list[tuple[int, bool]] = []

    def encode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen.append((ids.shape[0], module.training))
        return ids.float().sum(1, keepdim=True)

    outputs = encode_in_batches(module, tokenizer, texts, 2, encode)
    assert seen == [(2, False), (2, False), (1, False)] and module.training, "eval while encoding, mode restored"
    expected = tokenizer.encode(texts).input_ids.float().sum(1, keepdim=True)
    assert torch.equal(torch.cat(outputs), expected), "every text once, in order"

    def fails(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        encode_in_batches(module, tokenizer, texts, 2, fails)
    assert module.training, "the mode is restored after an error too"


@pytest.fixture(scope="module")
def local_model(tmp_path_factory: pytest.TempPathFactory, store) -> Path:  # noqa: ANN001
    """A tiny BERT with a tokenizer, saved the way users keep ClinicalBERT / CXR-BERT on disk."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("hf") / "tiny-bert"
    tokenizer = fit_tokenizer([str(r) for r in store.meta["report"]], vocab_size=300, min_frequency=1)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]").save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=48)
    BertModel(config).save_pretrained(directory)
    return directory


def test_local_hugging_face_model_trains_offline_and_reloads_identically(store, local_model) -> None:  # noqa: ANN001
    _, batch = _batch(store, tokenizer=str(local_model), max_length=40)
    params = {"text_encoder": str(local_model), "text_trainable_layers": 1}
    torch.manual_seed(0)
    method = build_method("clip", _backbone(), params)
    assert isinstance(method.text_encoder, HuggingFaceTextEncoder) and method.text_encoder.feature_dim == 32
    frozen = [n for n, p in method.text_encoder.named_parameters() if not p.requires_grad]
    assert any("embeddings" in n for n in frozen) and any("layer.0." in n for n in frozen)
    assert not any("layer.1." in n for n in frozen), "the last layer stays trainable"
    output = method(batch)
    output["loss"].backward()
    assert torch.isfinite(output["loss"])
    assert method.text_encoder.model.encoder.layer[1].attention.self.query.weight.grad is not None
    texts = ["Left upper zone nodule, small.", "The lungs are clear."]
    state = method.state_dict()
    torch.manual_seed(1)  # a different initialisation, overwritten by the state dict
    again = build_method("clip", _backbone(), params)
    again.load_state_dict(state)
    torch.testing.assert_close(again.embed_texts(texts), method.embed_texts(texts), rtol=0, atol=0)


def test_pretrained_text_encoder_needs_its_own_tokenizer(store, local_model: Path) -> None:  # noqa: ANN001
    method = build_method("convirt", _backbone(), {"text_encoder": str(local_model)})
    _, fitted = _batch(store)
    with pytest.raises(ConfigError, match="views.tokenizer is 'fit'.*set views.tokenizer: .*tiny-bert"):
        method(fitted)
    _, too_long = _batch(store, tokenizer=str(local_model), max_length=64)
    with pytest.raises(ConfigError, match="max_length 64 exceeds the 48 positions"):
        method(too_long)


def test_missing_model_directory_is_a_clear_error_not_a_download(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory.*never downloads models"):
        build_method("convirt", _backbone(), {"text_encoder": str(tmp_path / "ClinicalBERT")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load a Hugging Face model"):
        build_method("convirt", _backbone(), {"text_encoder": str(tmp_path / "empty")})

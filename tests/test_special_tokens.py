"""Adding the latent markers and initialising their embeddings."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from noblankslate.model.special_tokens import (
    END_LATENT,
    LATENT,
    START_LATENT,
    LatentTokenIds,
    add_latent_tokens,
    init_latent_embeddings,
)
from noblankslate.model.tokenizer import build_word_tokenizer

TEXTS = ["Tom is a wumpus.\n", "<<3*4=12>>\n", "### 12"]


def gpt2(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    return GPT2LMHeadModel(config)


def llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def test_add_latent_tokens_order_and_idempotence():
    tok = build_word_tokenizer(TEXTS)
    n = len(tok)
    ids = add_latent_tokens(tok)
    assert ids == LatentTokenIds(start_id=n, end_id=n + 1, latent_id=n + 2)
    assert len(tok) == n + 3
    assert add_latent_tokens(tok) == ids and len(tok) == n + 3
    text = f"Tom{START_LATENT}{LATENT}{LATENT}{END_LATENT}"
    assert tok.encode(text) == tok.encode("Tom") + [ids.start_id, ids.latent_id, ids.latent_id, ids.end_id]


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2-tied", "llama-untied"])
def test_rows_copied_from_double_angle(build):
    tok = build_word_tokenizer(TEXTS)
    model = build(len(tok))
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    source = tok.convert_tokens_to_ids("<<")
    assert source != tok.unk_token_id

    ids = add_latent_tokens(tok)
    init_latent_embeddings(model, tok, ids)

    new = list(ids.as_tuple())
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings().weight
    assert inputs.shape[0] == outputs.shape[0] == len(tok)
    torch.testing.assert_close(inputs[: len(before_in)], before_in, rtol=0, atol=0)
    torch.testing.assert_close(outputs[: len(before_out)], before_out, rtol=0, atol=0)
    torch.testing.assert_close(inputs[new], before_in[source].expand(3, -1), rtol=0, atol=0)
    torch.testing.assert_close(outputs[new], before_out[source].expand(3, -1), rtol=0, atol=0)


def test_llama_head_is_untied_and_gets_its_own_row():
    tok = build_word_tokenizer(TEXTS)
    model = llama(len(tok))
    ids = add_latent_tokens(tok)
    init_latent_embeddings(model, tok, ids)
    source = tok.convert_tokens_to_ids("<<")
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings().weight
    assert outputs.data_ptr() != inputs.data_ptr()
    assert not torch.equal(inputs[source], outputs[source])
    assert torch.equal(outputs[ids.latent_id], outputs[source])


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2-tied", "llama-untied"])
def test_mean_fallback_without_double_angle(build):
    tok = build_word_tokenizer(["Tom is a wumpus.\n", "### 12"])
    assert tok.convert_tokens_to_ids("<<") == tok.unk_token_id
    model = build(len(tok))
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()

    ids = add_latent_tokens(tok)
    init_latent_embeddings(model, tok, ids)

    new = list(ids.as_tuple())
    torch.testing.assert_close(model.get_input_embeddings().weight[new], before_in.mean(0).expand(3, -1))
    torch.testing.assert_close(model.get_output_embeddings().weight[new], before_out.mean(0).expand(3, -1))

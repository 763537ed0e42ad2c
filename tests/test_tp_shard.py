"""ringlet.mpi.tp.apply_tp's layout of the output head (the MPI tests check the sharded model's outputs)."""
import pytest
import torch

from ringlet.config import ModelConfig
from ringlet.model import Llama, random_weights
from ringlet.mpi.tp import apply_tp

CPU = torch.device("cpu")


def _model(vocab: int, tied: bool) -> Llama:
    cfg = ModelConfig(vocab_size=vocab, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16, max_seq_len=32,
                      tie_embeddings=tied)
    return Llama(cfg, random_weights(cfg, torch.float32, CPU), CPU, torch.float32)


@pytest.mark.parametrize("tied", [False, True])
def test_apply_tp_splits_the_head_by_vocabulary_rows(tied):
    for rank in range(2):
        model = _model(10, tied)
        head, embeddings = model.output.clone(), model.tok_embeddings.clone()
        apply_tp(model, 2, rank, comm=object())
        assert model.vocab_parallel
        assert torch.equal(model.output, head[5 * rank:5 * (rank + 1)])
        assert torch.equal(model.tok_embeddings, embeddings)  # every rank embeds any token
        shares = model.output.untyped_storage().data_ptr() == model.tok_embeddings.untyped_storage().data_ptr()
        # tied: a view of the embeddings' rows; untied: a copy, so the whole head can be freed
        assert shares == tied and (model.output._base is None) != tied


def test_a_vocabulary_that_does_not_split_keeps_the_whole_head():
    model = _model(11, tied=False)
    apply_tp(model, 2, 1, comm=object())
    assert not model.vocab_parallel and model.output.shape == (11, 8)

"""Row-vector rollouts equal the matrix recursions of the published code (dense, float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from captum_implicit.attr._rollout import rank_one_rollout_row, rollout_first_step, rollout_row, rollout_step
from captum_implicit.attr._utils import minmax


def _maps(n_layers=4, b=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, length, length, generator=g, dtype=torch.float64).tril() for _ in range(n_layers)]


def _start(q, length):
    return torch.nn.functional.one_hot(q, length).double()


def test_row_normalised_rollout_equals_chefer_compute_rollout_attention() -> None:
    maps, q = _maps(), torch.tensor([6, 3])
    eye = torch.eye(7, dtype=torch.float64)
    # Chefer et al.'s compute_rollout_attention (adapted from Abnar & Zuidema): + I, row-normalise, bmm
    mats = [(m + eye) / (m + eye).sum(-1, keepdim=True) for m in maps]
    for start_layer in (0, 2):
        joint = mats[start_layer]
        for m in mats[start_layer + 1 :]:
            joint = m.bmm(joint)
        got = rollout_row(_start(q, 7), reversed(maps[start_layer:]), row_normalize=True)
        assert rel_err(got, joint[torch.arange(2), q]) < 1e-13


@pytest.mark.parametrize("row_normalize", [True, False])
def test_first_step_from_the_query_rows_alone(row_normalize) -> None:
    (m,), q = _maps(n_layers=1, b=3), torch.tensor([6, 0, 3])
    rows = m[torch.arange(3), q]  # all the first layer of a rollout contributes, from one-hot rows
    want = rollout_step(_start(q, 7), m, row_normalize)
    assert rel_err(rollout_first_step(_start(q, 7), rows, row_normalize), want) < 1e-15


def test_unnormalised_rollout_equals_gae() -> None:
    maps, q = _maps(seed=1), torch.tensor([5, 6])
    R = torch.eye(7, dtype=torch.float64).expand(2, 7, 7)
    for m in maps:  # GAE (Chefer et al. 2021b): R ← R + Ā R
        R = R + m @ R
    got = rollout_row(_start(q, 7), reversed(maps), row_normalize=False)
    assert rel_err(got, R[torch.arange(2), q]) < 1e-13


def test_rank_one_rollout_equals_published_broadcast() -> None:
    g = torch.Generator().manual_seed(2)
    vecs, q = [torch.rand(2, 7, generator=g, dtype=torch.float64) for _ in range(3)], torch.tensor([6, 2])
    eye = torch.eye(7, dtype=torch.float64).expand(2, 7, 7)
    mats = [v[:, None, :] + eye for v in vecs]  # the published (1, L) + eye broadcast
    mats = [m / m.sum(-1, keepdim=True) for m in mats]
    joint = mats[0]
    for m in mats[1:]:
        joint = m.bmm(joint)
    got = rank_one_rollout_row(_start(q, 7), reversed(vecs))
    assert rel_err(got, joint[torch.arange(2), q]) < 1e-13


@pytest.mark.parametrize("dims", [(1,), (1, 2)])
def test_minmax_ignores_invalid_tokens(dims) -> None:
    x = torch.tensor([[[5.0, 1.0, 3.0, -9.0]], [[2.0, 4.0, 8.0, 0.0]]], dtype=torch.float64)
    x = x if dims == (1, 2) else x[:, 0]
    valid = torch.tensor([[True, True, True, False], [False, True, True, True]])
    out = minmax(x, valid, dims)
    flat = out if dims == (1,) else out[:, 0]
    assert torch.equal(flat[0], torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(flat[1], torch.tensor([0.0, 0.5, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(minmax(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), (1,)), torch.zeros(1, 3))

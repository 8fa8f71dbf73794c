"""Decode-loop pieces that need no model: padding, stop strings, parameter validation."""

import math

import numpy as np
import pytest

from onnxlm.runtime.driver import left_pad
from onnxlm.runtime.generate import GenerationParams, StopText


def test_left_pad_mask_and_positions():
    ids, mask, pos = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [1, 1, 0]]  # cumsum(mask) - 1, padding at 1
    assert ids.dtype == mask.dtype == pos.dtype == np.int64


def run_stop(stops, pieces):
    st = StopText(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = st.push(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(st.release())
    return out, hit


def test_stop_string_cuts_before_and_holds_partial_matches():
    out, hit = run_stop(["STOP"], ["hello S", "T", "OP and more"])
    assert hit and "".join(out) == "hello " and out[0] == "hello "  # "S", "T" held back
    assert out[1] == ""
    out, hit = run_stop(["STOP"], ["a ST", "ill going"])
    assert not hit and "".join(out) == "a STill going"
    out, hit = run_stop(["\n\n", "##"], ["one\n", "#", "#two"])
    assert hit and "".join(out) == "one\n"
    out, hit = run_stop(["ab"], ["xxa", "b"])
    assert hit and "".join(out) == "xx"
    out, hit = run_stop([], ["any", "thing"])
    assert not hit and out == ["any", "thing", ""]
    out, hit = run_stop(["end"], ["the end"])
    assert hit and out == ["the "]


def test_stop_earliest_of_several():
    out, hit = run_stop(["cd", "b"], ["abcd"])
    assert hit and out == ["a"]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, ValueError, "max_new_tokens"),
        ({"temperature": -1}, ValueError, "temperature"),
        ({"top_p": math.nan}, ValueError, "top_p"),
        ({"repetition_penalty": 0}, ValueError, "repetition_penalty"),
        ({"stop": ""}, ValueError, "stop"),
        ({"stop": ["ok", 3]}, ValueError, "stop"),
        ({"stop_token_ids": [-1]}, ValueError, "stop_token_ids"),
        ({"ignore_eos": "yes"}, ValueError, "ignore_eos"),
        ({"temprature": 0.5}, TypeError, "temprature"),
    ],
)
def test_invalid_generation_params(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GenerationParams.from_kwargs(**kwargs)


def test_params_normalise():
    p = GenerationParams.from_kwargs(stop="x", stop_token_ids=(3, np.int64(4)))
    assert p.stop == ["x"] and p.stop_token_ids == [3, 4] and p.max_new_tokens == 256 and p.temperature == 0

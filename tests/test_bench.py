"""bench/train_step.py options that need no compile: TPU topology names for --aot_topology."""

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
  return load_script("bench/train_step.py", "bench_train_step")


@pytest.mark.parametrize(
    "topology, expected",
    [
        ("v5p:2x2x1", {}),
        ("v5e:2x2", {}),
        ("v5p:4x4x4", {}),
        ("v5e:1x1", {"chips_per_host_bounds": [1, 1, 1]}),
        ("v5p:1x1x1", {"chips_per_host_bounds": [1, 1, 1]}),
        ("v6e:2x1", {"chips_per_host_bounds": [2, 1, 1]}),
    ],
    ids=[
        "v5p_one_host",
        "v5e_one_host",
        "v5p_pod_slice",
        "v5e_one_chip",
        "v5p_one_chip",
        "v6e_two_chips",
    ],
)
def test_topology_options_name_host_bounds_below_one_host(bench, topology, expected):
  assert bench.topology_options(topology) == expected


@pytest.mark.parametrize(
    "topology",
    ["v5p", "v5p:", "v5p:2xx2", ":2x2", "v5e:0x2", "v5p:2x2x2x2"],
    ids=["no_layout", "empty_layout", "bad_dim", "no_generation", "zero_dim", "four_dims"],
)
def test_topology_options_reject_malformed_names(bench, topology):
  with pytest.raises(ValueError, match="--aot_topology"):
    bench.topology_options(topology)

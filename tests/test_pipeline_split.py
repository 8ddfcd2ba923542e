"""Layer split and rank placement (no processes needed)."""
import pytest

from comm import rank_to_coords
from pipeline_parallel import LayoutError, split_layers, stage_ids_of_rank


def sizes(bounds):
    return [end - start for start, end in bounds]


def test_gpt_neox_20b_recipe_split():
    """The shipped 20B script: 44 layers, 8 stages, --num-layers 6 (OpenChatKit's value) is the largest stage."""
    bounds = split_layers(44, 8, layers_per_stage=6)
    assert sizes(bounds) == [6, 6, 6, 6, 5, 5, 5, 5]
    assert bounds[0][0] == 0 and bounds[-1][1] == 44
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_num_layers_that_does_not_fit_names_the_right_value():
    with pytest.raises(LayoutError, match="--num-layers 5.*use --num-layers 6"):
        split_layers(44, 8, layers_per_stage=5)
    with pytest.raises(LayoutError, match="8 pipeline stages for a model of 4 layers"):
        split_layers(4, 8)


def test_interleaved_placement_and_rank_mapping():
    assert stage_ids_of_rank(1, 4, 2) == [1, 5]
    assert [rank_to_coords(r, 4) for r in (0, 3, 4, 7)] == [(0, 0), (3, 0), (0, 1), (3, 1)]

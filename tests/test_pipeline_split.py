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


def test_without_num_layers_the_last_stage_gives_up_layers_for_the_head():
    """The last stage also runs the LM head: layers move to earlier stages while that lowers the busiest stage."""
    import modules

    assert sizes(split_layers(24, 2, head_cost=1.75)) == [13, 11]  # busiest 13 instead of 12 + 1.75
    assert sizes(split_layers(32, 4, head_cost=0.95)) == [8, 8, 8, 8]  # 9,8,8,7 would be busier than 8 + 0.95
    assert sizes(split_layers(44, 8, head_cost=0.65)) == [6, 6, 6, 6, 5, 5, 5, 5]
    assert sizes(split_layers(4, 2, head_cost=50.0)) == [3, 1]  # every stage keeps a layer
    # --num-layers given: OpenChatKit's split as is, whatever the head costs
    assert sizes(split_layers(24, 2, layers_per_stage=12, head_cost=1.75)) == [12, 12]
    # the head's share from the config: Pythia-1.4B shape, 2048 tokens
    cfg = modules.model_config_from_dict(
        {
            "model_type": "gpt_neox",
            "hidden_size": 2048,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 8192,
            "vocab_size": 50304,
            "max_position_embeddings": 2048,
        },
        "gptneox",
    )
    assert modules.head_cost_in_layers(cfg, 2048) == pytest.approx(
        6 * 50304 * 2048 / (6 * 50.35e6 + 12 * 2048**2), rel=0.01
    )

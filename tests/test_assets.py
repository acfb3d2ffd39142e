"""The offline asset loader: real model directories and deterministic data splits."""

import pytest

from benchmarks import assets


def test_rotten_tomatoes_split_is_deterministic_balanced_and_disjoint(rotten_tomatoes):
    again = assets.rotten_tomatoes()
    assert again == rotten_tomatoes
    train, validation, test = rotten_tomatoes.train, rotten_tomatoes.validation, rotten_tomatoes.test
    assert (len(train[0]), len(validation[0]), len(test[0])) == (6530, 1000, 1000)
    assert not set(test[0]) & set(train[0])
    assert 450 < sum(test[1]) < 550 and set(test[1]) == {0, 1}


def test_minilm_directory_holds_a_loadable_encoder(minilm_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(minilm_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    assert (minilm_dir / "model.safetensors").exists() and (minilm_dir / "tokenizer.json").exists()


@pytest.mark.slow
def test_smollm2_converted_checkpoint(smollm2_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert not hasattr(config, "quantization_config")


def test_hamlet_corpus():
    try:
        text = assets.hamlet_text()
    except assets.AssetMissingError as error:
        pytest.skip(str(error))
    assert "Hamlet" in text and len(text) > 100_000


def test_missing_package_names_the_package():
    with pytest.raises(assets.AssetMissingError, match="pip install --no-deps not-a-real-asset"):
        assets.package_dir("not_a_real_asset_package", "not-a-real-asset")

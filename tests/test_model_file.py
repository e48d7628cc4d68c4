"""The model file's contract (`clusterar.model_file.ModelInfo`) and the per-method rules on `Method`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clusterar import ClusterarError
from clusterar.clusters import CodebookClusters
from clusterar.fileio import read_meta, save_tensors
from clusterar.gpt import GPT, gpt_preset
from clusterar.methods import Method
from clusterar.model_file import (
    MODEL_FILE,
    MODEL_INFO_VERSION,
    ModelInfo,
    load_model,
    read_model_info,
    resolve_model_file,
    save_model,
)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(gpt_preset("tiny")).eval()


def _full_info() -> ModelInfo:
    return ModelInfo(
        method="iar",
        preset="tiny",
        tokenizer="/t/tok.safetensors",
        tokenizer_fingerprint="tok-fp",
        clusters="/t/bal.safetensors",
        clusters_fingerprint="cl-fp",
        n_clusters=8,
        cluster_weight=0.5,
        id_space="rearranged",
        restrict_to_cluster=False,
        step=12,
        epoch=1.5,
        image_size=32,
        grid=[8, 8],
        dataset="mnist",
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        tokens="/t/train.safetensors",
        init_from="/t/start/model.safetensors",
        init_epoch=2.0,
        converted_from="/t/base",
        conversion={"method": "iar", "head": None},
        gpt_config=gpt_preset("tiny"),
    )


def test_round_trip_in_memory_and_on_disk(tmp_path):
    info = _full_info()
    d = info.to_dict()
    assert d["version"] == MODEL_INFO_VERSION and d["gpt_config"] == gpt_preset("tiny").to_dict()
    assert ModelInfo.from_dict(d) == info
    assert "source" not in d  # None fields are not written
    model = _model()
    save_model(tmp_path / MODEL_FILE, model, dataclasses.replace(info, gpt_config=None))
    assert read_meta(tmp_path / MODEL_FILE)["kind"] == "gpt"
    assert read_model_info(tmp_path / MODEL_FILE) == info  # save_model records the model's config
    loaded, got = load_model(resolve_model_file(tmp_path, "model"))
    assert got == info
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def test_derived_facts():
    assert ModelInfo(epoch=1.5, init_epoch=2.0).total_epoch == 3.5
    assert ModelInfo(epoch=1.5).total_epoch == 1.5 and ModelInfo().total_epoch == 0.0
    assert ModelInfo(method="ctf-refiner").is_ctf_stage and not ModelInfo(method="iar").is_ctf_stage
    assert ModelInfo(id_space="rearranged").rearranged and not ModelInfo().rearranged


def _old_trainer_header(model: GPT) -> dict:
    """A model file's metadata as `Trainer.info` + `gpt.save_gpt` wrote it before ModelInfo (no version,
    None values written as null)."""
    info = {
        "method": "baseline",
        "preset": "tiny",
        "tokenizer": "/runs/tok/tokenizer.safetensors",
        "tokenizer_fingerprint": "abc",
        "clusters": None,
        "clusters_fingerprint": None,
        "n_clusters": None,
        "cluster_weight": 1.0,
        "id_space": "original",
        "restrict_to_cluster": False,
        "step": 40,
        "epoch": 0.8333,
        "image_size": 32,
        "grid": [8, 8],
        "dataset": "mnist",
        "num_classes": 10,
        "class_names": None,
        "tokens": "/runs/tokens/train.safetensors",
        "init_from": None,
        "init_epoch": 0.0,
    }
    return {"kind": "gpt", "gpt_config": model.config.to_dict(), **info}


def _old_convert_header(model: GPT) -> dict:
    """... and as `convert` wrote it (no cluster_weight, tokens nor init_from)."""
    info = {
        "preset": None,
        "tokenizer": "/w/vq_ds16_c2i.pt",
        "tokenizer_fingerprint": "abc",
        "clusters": "/w/bal.safetensors",
        "clusters_fingerprint": "def",
        "n_clusters": 8,
        "restrict_to_cluster": False,
        "step": 0,
        "epoch": 0.0,
        "init_epoch": 3.0,
        "converted_from": "/w/c2i_B_256.pt",
        "conversion": {"method": "iar", "head": None},
        "image_size": None,
        "grid": [8, 8],
        "dataset": None,
        "num_classes": 10,
        "class_names": None,
    }
    return {
        "kind": "gpt",
        "gpt_config": model.config.to_dict(),
        **info,
        "method": "iar",
        "id_space": "rearranged",
    }


@pytest.mark.parametrize("header", [_old_trainer_header, _old_convert_header])
def test_files_written_before_model_info_load(tmp_path, header):
    model = _model(1)
    old = header(model)
    save_tensors(tmp_path / "old.safetensors", model.state_dict(), old)
    info = read_model_info(tmp_path / "old.safetensors")
    assert info.version == 1
    for k, v in old.items():
        if k != "kind":
            got = getattr(info, k)
            assert (got.to_dict() if k == "gpt_config" else got) == v, k
    loaded, _ = load_model(tmp_path / "old.safetensors")
    assert torch.equal(loaded.output.weight, model.output.weight)
    # written again, the same keys and values (None fields left out), plus the version
    rewritten = {k: v for k, v in old.items() if v is not None and k != "kind"}
    assert info.to_dict() == {**rewritten, "version": 1}
    assert info.total_epoch == float(old["epoch"]) + float(old["init_epoch"])


def test_a_newer_or_foreign_model_file_is_refused(tmp_path):
    model = _model()
    header = {**_old_trainer_header(model), "version": MODEL_INFO_VERSION + 1}
    save_tensors(tmp_path / "new.safetensors", model.state_dict(), header)
    with pytest.raises(ClusterarError, match="written by a newer clusterar") as e:
        read_model_info(tmp_path / "new.safetensors")
    assert str(tmp_path / "new.safetensors") in str(e.value)
    with pytest.raises(ClusterarError, match="does not know"):
        ModelInfo.from_dict({"method": "baseline", "temperature": 1.0})
    save_tensors(tmp_path / "bare.safetensors", model.state_dict(), {"kind": "gpt", "method": "baseline"})
    with pytest.raises(ClusterarError, match="gpt_config"):
        read_model_info(tmp_path / "bare.safetensors")
    save_tensors(tmp_path / "tok.safetensors", {"w": torch.zeros(1)}, {"kind": "clusterar.tokenizer"})
    with pytest.raises(ClusterarError, match="is a tokenizer, not a model file"):
        read_model_info(tmp_path / "tok.safetensors")


def test_resolve_model_file(tmp_path):
    with pytest.raises(ClusterarError, match=f"is a folder without {MODEL_FILE}"):
        resolve_model_file(tmp_path, "model")
    with pytest.raises(ClusterarError, match="model not found"):
        resolve_model_file(tmp_path / "missing", "model")
    (tmp_path / MODEL_FILE).write_bytes(b"x")
    assert resolve_model_file(tmp_path, "model") == tmp_path / MODEL_FILE


# ----------------------------------------------------------------------------- the rules of each method


def test_needs_clusters():
    for method in ("iar", "ctf", "ctf-coarse", "ctf-refiner"):
        assert Method.needs_clusters(method)
        with pytest.raises(ClusterarError, match=f"--method {method} needs --clusters FILE"):
            Method.check_clusters_given(method, False)
        Method.check_clusters_given(method, True)
    assert not Method.needs_clusters("baseline")
    Method.check_clusters_given("baseline", False)
    # a spec names its keys
    with pytest.raises(
        ClusterarError, match=r"^method iar needs `clusters = NAME` \(a \[clusters.NAME\] table\)"
    ):
        Method.check_clusters_given(
            "iar", False, method_key="method", clusters_key="`clusters = NAME` (a [clusters.NAME] table)"
        )
    with pytest.raises(ClusterarError, match="needs --clusters"):
        Method("ctf-coarse", 16)


def test_iar_rearranged_ids_need_equal_size_clusters():
    codebook = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    unequal = CodebookClusters.from_labels(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), codebook, "kmeans", 2)
    equal = CodebookClusters.from_labels(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), codebook, "balanced", 2)
    for clusters in ("kmeans", "hierarchical", unequal):
        with pytest.raises(ClusterarError, match="IAR's rearranged ids need equal-size clusters") as e:
            Method.check_equal_size("iar", clusters)
        assert "pass --no-rearrange to use the segment cluster loss" in str(e.value)
        Method.check_equal_size("iar", clusters, rearrange=False)  # original ids: any clusters
        Method.check_equal_size("ctf", clusters)
    with pytest.raises(ClusterarError, match="3..5 codes") as e:
        Method.check_equal_size("iar", unequal, no_rearrange=None)  # convert: no way around
    assert "segment" not in str(e.value)
    with pytest.raises(ClusterarError, match="set rearrange = false in the run's train table"):
        Method.check_equal_size(
            "iar", "kmeans", no_rearrange="set rearrange = false in the run's train table"
        )
    for clusters in ("balanced", "random", equal):
        Method.check_equal_size("iar", clusters)
    with pytest.raises(ClusterarError, match="equal-size clusters"):
        Method("iar", 8, unequal)
    assert Method("iar", 8, unequal, rearrange=False).id_space == "original"


def test_restrict_to_cluster_only_for_the_refiner_and_sampled_as_trained():
    for method in ("baseline", "iar", "ctf-coarse", "ctf"):
        with pytest.raises(
            ClusterarError, match="--restrict-to-cluster only applies to --method ctf-refiner"
        ):
            Method.check_restrict_to_cluster(method, True)
        Method.check_restrict_to_cluster(method, False)
    Method.check_restrict_to_cluster("ctf-refiner", True)
    with pytest.raises(ClusterarError, match="restrict_to_cluster only applies to CTF's refiner"):
        Method.check_restrict_to_cluster(
            "ctf-coarse", True, key="restrict_to_cluster", refiner="CTF's refiner (its [refiner] table)"
        )
    # sampling
    with pytest.raises(ClusterarError, match="must be sampled with the same mask"):
        Method.sampling_restricted(False, True, True, "p.json")
    with pytest.raises(ClusterarError, match="only applies to CTF pipelines"):
        Method.sampling_restricted(True, False, False, "run")
    assert Method.sampling_restricted(None, True, True, "p.json")
    assert Method.sampling_restricted(True, False, True, "p.json")
    assert not Method.sampling_restricted(None, False, True, "p.json")
    assert not Method.sampling_restricted(None, False, False, "run")


def test_method_of_a_model_file():
    codebook = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    cl = CodebookClusters.from_labels(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), codebook, "balanced", 2)
    m = Method.from_info(ModelInfo(method="iar", id_space="rearranged", cluster_weight=0.5), 8, cl)
    assert (m.name, m.id_space, m.cluster_weight, m.restrict_to_cluster) == ("iar", "rearranged", 0.5, False)
    m = Method.from_info(ModelInfo(method="iar"), 8, cl)  # convert records no cluster weight: IAR's 1.0
    assert (m.id_space, m.cluster_weight) == ("original", 1.0)
    m = Method.from_info(ModelInfo(method="ctf-refiner", restrict_to_cluster=True), 8, cl)
    assert m.restrict_to_cluster

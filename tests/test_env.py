import tempfile
from pathlib import Path

import pytest

from kit import env


def make_competition(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "train.csv").write_text("id,encoding\n")
    (path / "sample_submission.csv").write_text("id,predicted\n")
    return path


def test_detect_kinds(tmp_path):
    missing = tmp_path / "no-kaggle"
    assert env.detect(modules={}, environ={}, kaggle_input=missing) == "local"
    assert env.detect(modules={"google.colab": object()}, environ={}, kaggle_input=missing) == (
        "colab"
    )
    assert env.detect(modules={}, environ={"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, kaggle_input=missing)
    kaggle = tmp_path / "input"
    kaggle.mkdir()
    assert env.detect(modules={"google.colab": 1}, environ={}, kaggle_input=kaggle) == "kaggle"


@pytest.mark.parametrize(
    "layout",
    [
        "hubmap-kidney-segmentation",
        "competitions/hubmap-kidney-segmentation",
        "datasets/someone/hubmap-kidney-segmentation",
    ],
)
def test_finds_competition_in_every_mount_layout(tmp_path, layout):
    root = tmp_path / "input"
    # A decoy dataset with only one marker file must not be taken.
    (root / "aaa-decoy").mkdir(parents=True)
    (root / "aaa-decoy" / "sample_submission.csv").write_text("id,predicted\n")
    target = make_competition(root / layout)
    assert env.find_competition_data(root) == target
    assert env.find_data(environ={}, kaggle_input=root, local=()) == (target, "kaggle")


def test_prefers_the_competition_name(tmp_path):
    root = tmp_path / "input"
    make_competition(root / "aaa-copy")
    target = make_competition(root / "competitions" / env.COMPETITION)
    assert env.find_competition_data(root) == target


def test_env_override_wins_and_is_checked(tmp_path):
    data = make_competition(tmp_path / "mine")
    kaggle = make_competition(tmp_path / "input" / env.COMPETITION)
    got = env.find_data(environ={"HUBMAP_DATA": str(data)}, kaggle_input=kaggle.parent)
    assert got == (data, "env")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        env.find_data(environ={"HUBMAP_DATA": str(tmp_path / "nowhere")})


def test_local_then_nothing(tmp_path):
    local = make_competition(tmp_path / "data")
    missing = tmp_path / "no-kaggle"
    got = env.find_data(environ={}, kaggle_input=missing, local=(tmp_path / "x", local))
    assert got == (local, "local")
    with pytest.raises(FileNotFoundError, match="HUBMAP_DATA"):
        env.find_data(environ={}, kaggle_input=missing, local=(tmp_path / "x",), synthetic=False)


def test_find_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "best.pt").write_bytes(b"x")
    (tmp_path / "a" / "last.pt").write_bytes(b"x")
    assert env.find_files("**/best.pt", (tmp_path, tmp_path / "missing")) == [
        tmp_path / "a" / "b" / "best.pt"
    ]


def test_check_imports_names_each_module_that_fails():
    env.check_imports()  # this environment has them all
    with pytest.raises(ImportError) as caught:
        env.check_imports({"json": "stdlib", "no_such_module_x1": "nothing", "no_such_y2": "no"})
    lines = str(caught.value).splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["no_such_module_x1", "no_such_y2"]
    assert "(from nothing): ModuleNotFoundError" in lines[0]


def test_every_third_party_import_of_the_kit_is_checked():
    import ast
    import sys
    from pathlib import Path

    kit_dir = Path(env.__file__).parent
    imported = set()
    for path in kit_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"kit", "__future__"}
    # packaging and jupytext-free: what the wheel builder uses is a pip dependency, always there.
    assert third_party - {"packaging"} == set(env.DEPENDENCIES)


def test_scratch_dir_on_kaggle_only_and_outside_working(tmp_path):
    temp = tmp_path / "temp"
    assert env.scratch_dir("local", kaggle_temp=temp) is None
    assert env.scratch_dir("colab", kaggle_temp=temp) is None
    expected = Path(tempfile.gettempdir()) / "hubmap-kit"
    assert env.scratch_dir("kaggle", kaggle_temp=temp) == expected
    temp.mkdir()
    assert env.scratch_dir("kaggle", kaggle_temp=temp) == temp / "hubmap-kit"

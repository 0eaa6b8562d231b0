import pytest

from scin_pipeline.core.paths import UnsafeObjectPath, image_id_from_path, image_object_path


@pytest.mark.parametrize(
    "path,image_id",
    [
        ("dataset/images/-3205742176803893704.png", "-3205742176803893704"),
        ("dataset/images/742075435141960831.png", "742075435141960831"),
        ("dataset/images/0.png", "0"),
    ],
)
def test_valid_paths_give_their_image_id(path, image_id):
    assert image_id_from_path(path) == image_id
    assert image_object_path(image_id) == path


@pytest.mark.parametrize(
    "path,reason",
    [
        ("dataset/images/../../etc/passwd", "traversal"),
        ("dataset/images/../scin_cases.csv", "traversal"),
        ("/etc/passwd", "absolute"),
        ("C:/Windows/win.ini", "absolute"),
        ("dataset\\images\\1.png", "backslash"),
        ("dataset/other/1.png", "outside"),
        ("dataset/images/1.jpg", "<signed int>.png"),
        ("dataset/images/abc.png", "<signed int>.png"),
        ("dataset/images/007.png", "<signed int>.png"),
        ("dataset/images/1.png/x", "<signed int>.png"),
        ("dataset/images/sub/1.png", "<signed int>.png"),
        ("dataset/images/99999999999999999999.png", "<signed int>.png"),
        ("dataset/images/9223372036854775808.png", "64-bit"),
        ("dataset/images/1.png\x00", "control"),
        ("", "empty"),
    ],
)
def test_unsafe_paths_are_rejected_with_a_reason(path, reason):
    with pytest.raises(UnsafeObjectPath) as info:
        image_id_from_path(path)
    assert reason in info.value.reason
    assert repr(path) in str(info.value)

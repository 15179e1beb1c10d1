"""The ImageFolder datamodule on tiny JPEG folders in ImageNet's layout, and WRN-50-2 against torchvision's."""

import pytest
import torch
import torchvision

from datamodules import CorruptDataError, DataError, DataNotFoundError, ImageFolderData
from lightning_modules.counting import count
from lightning_modules.nets import WideResNetImageNet
from tests.conftest import make_image_folder


def test_image_folder_batches_are_augmented_normalised_crops(tmp_path):
    data = ImageFolderData(str(make_image_folder(tmp_path, classes=3)), image_size=32, batch_size=4, num_workers=0)
    data.setup("fit")
    assert data.num_classes == 3 and data.input_shape == (3, 32, 32)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    assert -3 < x.mean() < 3 and x.std() > 0.3  # normalised with ImageNet's statistics
    val = [y for _, y in data.val_dataloader()]
    assert torch.cat(val).tolist() == [0, 0, 1, 1, 2, 2]  # every validation image once, in order


def test_image_folder_problems_are_clear_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"put ImageNet .* in .*/train/<class>/\*\.JPEG"):
        ImageFolderData(str(tmp_path / "nowhere")).setup("fit")
    root = make_image_folder(tmp_path / "mismatch")
    (root / "val" / "n00000009").mkdir()
    (root / "val" / "n00000009" / "x.JPEG").write_bytes((root / "val" / "n00000000" / "img_0.JPEG").read_bytes())
    with pytest.raises(DataError, match="must be the same classes"):
        ImageFolderData(str(root)).setup("fit")
    root = make_image_folder(tmp_path / "corrupt")
    (root / "val" / "n00000001" / "img_1.JPEG").write_bytes(b"truncated")
    data = ImageFolderData(str(root), image_size=32, batch_size=4, num_workers=0)
    data.setup("fit")
    with pytest.raises(CorruptDataError, match="img_1.JPEG: not a readable image"):
        list(data.val_dataloader())


def test_wrn50_2_is_torchvisions_net_module_for_module():
    mine, theirs = WideResNetImageNet(), torchvision.models.wide_resnet50_2()
    assert [(k, v.shape) for k, v in mine.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()
    ]
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(mine.eval()(x), theirs.eval()(x))
    result = count(mine, (3, 224, 224))
    assert result.params == 68_883_240 and f"{result.mult_adds:.5E}" == "1.14109E+10"


def test_a_wrn50_2_student_substitutes_the_3x3_convs_only():
    student = WideResNetImageNet(conv="Shuffle_4", checkpoint_blocks=True)
    spatial = [m for m in student.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert spatial and all(m.groups == m.in_channels for m in spatial)  # only depthwise 3x3 convs remain
    assert student.layer3[0].conv1.kernel_size == (1, 1)
    out = student(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 1000) and student.fc.weight.grad is not None

"""VectorQuantize usage as it circulates for the reference (the VectorQuantizer alias, Chinese comments) runs.

Shapes are those the usage notes state, except the loss: their "(1)" / "(1,)" comments are stale, the
reference returns a 0-dim loss and so do we.
"""

import torch

import vector_quantize_pytorch


def test_vq():
    from vector_quantize_pytorch import VectorQuantizer

    vq = VectorQuantizer(
        dim=256,
        codebook_size=512,  # 码本尺寸
        decay=0.8,  # 指数移动平均衰减率, 越低表示字典更新越快
        commitment_weight=1.0,  # Commitment Loss 权重
    )

    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024) and commit_loss.shape == ()


def test_rotation_trick():
    from vector_quantize_pytorch import VectorQuantizer

    vq = VectorQuantizer(
        dim=256,
        codebook_size=256,
        rotation_trick=True,  # True 使用旋转技巧/False 使用直通估计器
    )
    assert vq.rotation_trick
    ste = VectorQuantizer(dim=256, codebook_size=256, rotation_trick=False)
    assert not ste.rotation_trick
    x = torch.randn(1, 16, 256, requires_grad=True)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == (1, 16, 256) and indices.shape == (1, 16) and commit_loss.shape == ()


def test_smaller_codebook_dim():
    from vector_quantize_pytorch import VectorQuantizer

    vq = VectorQuantizer(
        dim=256,
        codebook_size=256,
        codebook_dim=16,  # 论文提出设置为 32 或 8 来提升码本使用率
    )

    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024) and commit_loss.shape == ()
    assert vq.codebook.shape == (256, 16)


def test_cosine_similarity():
    from vector_quantize_pytorch import VectorQuantizer

    vq = VectorQuantizer(
        dim=256,
        codebook_size=256,
        use_cosine_sim=True,
    )

    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024) and commit_loss.shape == ()
    torch.testing.assert_close(vq.codebook.norm(dim=-1), torch.ones(256))


def test_expire_dead_codes():
    from vector_quantize_pytorch import VectorQuantizer

    vq = VectorQuantizer(
        dim=256,
        codebook_size=512,
        threshold_ema_dead_code=2,  # 应主动替换那些有指数移动平均聚类大小小于 2 的编码
    )

    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024) and commit_loss.shape == ()
    # every code is either used enough or was just replaced (count reset to the threshold)
    assert (vq._codebook.cluster_size >= 2 - 1e-5).all()


def test_orthogonal_regularization():
    from vector_quantize_pytorch import VectorQuantize

    vq = VectorQuantize(
        dim=256,
        codebook_size=256,
        accept_image_fmap=True,  # True 表示传递图像特征图
        orthogonal_reg_weight=10,  # 论文中推荐设置为 10
        orthogonal_reg_max_codes=128,  # 限制内存用量, 从码本随机采样用于正交正则化损失
        orthogonal_reg_active_codes_only=False,  # 非常大的码本设为 True, 仅计算每批次激活的码本的损失
    )

    img_fmap = torch.randn(1, 256, 32, 32)
    quantized, indices, loss = vq(img_fmap)
    assert quantized.shape == (1, 256, 32, 32) and indices.shape == (1, 32, 32) and loss.shape == ()
    _, _, _, parts = vq(img_fmap, return_loss_breakdown=True)
    assert parts.orthogonal_reg > 0  # 损失现在包含了带权重的正交正则化损失


def test_multi_head_vq():
    from vector_quantize_pytorch import VectorQuantize

    vq = VectorQuantize(
        dim=256,
        codebook_dim=32,  # a number of papers have shown smaller codebook dimension to be acceptable
        heads=8,  # number of heads to vector quantize, codebook shared across all heads
        separate_codebook_per_head=True,  # a separate codebook per head; False: 1 shared codebook
        codebook_size=8196,
        accept_image_fmap=True,
    )

    img_fmap = torch.randn(1, 256, 32, 32)
    quantized, indices, loss = vq(img_fmap)
    assert quantized.shape == (1, 256, 32, 32) and indices.shape == (1, 32, 32, 8) and loss.shape == ()


def test_both_names_are_exported():
    assert vector_quantize_pytorch.VectorQuantizer is vector_quantize_pytorch.VectorQuantize
    assert {"VectorQuantize", "VectorQuantizer"} <= set(vector_quantize_pytorch.__all__)

"""BoundSlotDecoder with its KV buffers in GPU memory (CuPy), as the ONNX Runtime CUDA and TensorRT
backends keep them: the same captions as with host numpy buffers.

Neither onnxruntime-gpu nor TensorRT exists on this project's machines, so the graphs are run by
the PyTorch model on the same GPU, reading and writing the CuPy buffers in place through DLPack
(``prefill`` is the model's forward over the frames, ``decode`` is ``CaptionDecoder.decode``: the
math the exported graphs were made from). Both sides do identical GPU arithmetic; only where the
slot buffers live differs, so every token must be equal: this checks the device side of
BoundSlotDecoder (row writes at each row's column, beam reorders, padded batch buckets, argmax
and logits crossing back) that the CPU tests cannot reach."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from v2t_engine.runtime.generator import stream_captions  # noqa: E402
from v2t_engine.runtime.search import SearchOptions  # noqa: E402
from v2t_training.torch_backend import TorchBackend  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class DeviceArrays(TorchBackend):
    """The reference model on CUDA over buffers of the array module `xp`: CuPy device arrays, or
    host numpy arrays copied to the GPU and back."""

    def __init__(self, checkpoint, xp, buckets: bool):
        super().__init__(checkpoint, device="cuda")
        self.xp, self.batch_buckets = xp, buckets
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides, bit for bit

    def _in(self, array):
        return torch.from_dlpack(array) if self.xp is not np else torch.from_numpy(array).cuda()

    def _out(self, dst, src: torch.Tensor) -> None:
        if self.xp is np:
            dst[...] = src.cpu().numpy()
        else:
            torch.from_dlpack(dst).copy_(src)
            torch.cuda.synchronize()  # CuPy reads the buffer next, on its own stream

    @torch.inference_mode()
    def prefill(self, prefix, logits, kv_out) -> None:
        x = self._in(prefix)
        out, present = self.model.transformer(torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device),
                                              prefix_embeds=x, last_only=True)
        self._copy(out, present, logits, kv_out)

    @torch.inference_mode()
    def decode(self, input_ids, position_ids, cache, logits, kv_out) -> None:
        pairs = [(self._in(cache[2 * i]), self._in(cache[2 * i + 1])) for i in range(len(cache) // 2)]
        out, new = self.model.transformer.decode(self._in(input_ids), self._in(position_ids), pairs)
        self._copy(out, new, logits, kv_out)

    def _copy(self, out, kv, logits, kv_out) -> None:
        self._out(logits, out)
        for dst, src in zip(kv_out, (t for pair in kv for t in pair)):
            self._out(dst, src)


@pytest.fixture(scope="module")
def cupy():
    return pytest.importorskip("cupy", reason="needs CuPy (the gpu extra)")


@pytest.mark.parametrize("opts,slots,seed", [
    (SearchOptions(), 3, None),
    (SearchOptions(), 8, None),
    (SearchOptions(num_beams=3, num_return=2), 7, None),
    (SearchOptions(do_sample=True, top_k=20, temperature=1.5, num_return=2), 5, 3),
], ids=["greedy-3", "greedy-8", "beams", "sampled"])
def test_device_buffers_give_the_host_buffers_captions(random_checkpoint, test_pixels, cupy, opts, slots, seed):
    host = DeviceArrays(random_checkpoint, np, buckets=False)
    device = DeviceArrays(random_checkpoint, cupy, buckets=True)  # padded buckets, as ORT CUDA runs

    def ids(backend):
        got = dict(stream_captions(backend, enumerate(test_pixels), opts, backend.config.text_len, slots, seed))
        return np.stack([got[i] for i in range(len(test_pixels))])

    want = ids(host)
    assert len({tuple(c) for c in want[:, 0]}) > 1  # captions differ from video to video
    assert np.array_equal(ids(device), want)

import torch, time
from torch._dynamo.testing import CompileCounterWithBackend
from projected_grpo.models import load_model
from projected_grpo.rollout import RolloutEngine, RECOMPILE_LIMIT
model, tok, _ = load_model("tiny-random-qwen3", "cpu")
engine = RolloutEngine(model, tok)
counter = CompileCounterWithBackend("eager")
engine._compiled = torch.compile(engine._decode_layer, backend=counter)
dev = torch.device("cpu")
weights = engine.layer_weights()
def run(b, window, cap=640):
    k = [torch.zeros(b, engine.n_kv, cap, engine.head_dim) for _ in engine.body.layers]
    v = [torch.zeros_like(x) for x in k]
    tokens = torch.randint(100, 1000, (b,)); positions = torch.full((b,), window - 5)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        engine.decode(tokens, positions, k, v, window, weights, compiled=True)
shapes = [(8, 128), (8, 256), (8, 384), (4, 384), (4, 512), (2, 512), (1, 512)]
for call, cap in enumerate((640, 700, 768)):
    before = counter.frame_count
    t = time.perf_counter()
    for b, w in shapes:
        run(b, w, cap)
    print(f"call {call}: frames compiled {counter.frame_count - before}, {time.perf_counter() - t:.2f} s")
    weights = engine.layer_weights()  # a new call's fused weights

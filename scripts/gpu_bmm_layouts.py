"""Times the batched products of the Broyden and Anderson steps on CUDA in several layouts
(the device check that chose two matrix-vector products for Broyden on CUDA; see BENCHMARKS.md).
Run on a GPU machine: python scripts/gpu_bmm_layouts.py"""

import torch

dev = "cuda"
B, q, D = 32, 20, 30720
torch.manual_seed(0)
S = torch.randn(B, q, D, device=dev)
g = torch.randn(B, D, device=dev)
s = torch.randn(B, D, device=dev)
G = torch.randn(B, 6, D, device=dev)


def t(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for _ in range(n):
        fn()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) / n * 1e3


def splitk(A, X, c):  # A (B,p,D), X (B,D,r) -> (B,p,r) summing c chunks of K
    Bn, p, Dd = A.shape
    r = X.shape[-1]
    a = A.view(Bn, p, c, Dd // c).transpose(1, 2).reshape(Bn * c, p, Dd // c)
    x = X.reshape(
        Bn * c, Dd // c, r
    )  # chunk k of sample b is rows k*D/c..(k+1)*D/c of X[b] (copies when X is a transposed view)
    return torch.bmm(a, x).view(Bn, c, p, r).sum(1)


ref = S @ torch.stack((g, s), -1)
res = {
    "broyden A: S @ stack(g,s,-1)": lambda: S @ torch.stack((g, s), -1),
    "broyden B: S @ stack(g,s,1).mT": lambda: S @ torch.stack((g, s), 1).mT,
    "broyden C: stack(g,s,1) @ S.mT": lambda: (torch.stack((g, s), 1) @ S.mT).mT,
    "broyden two gemv": lambda: torch.cat((S @ g.unsqueeze(-1), S @ s.unsqueeze(-1)), -1),
    "broyden einsum": lambda: torch.einsum("bqd,bkd->bqk", S, torch.stack((g, s), 1)),
    "broyden mul-sum": lambda: (S.unsqueeze(2) * torch.stack((g, s), 1).unsqueeze(1)).sum(-1),
}
for c in (8, 16, 32, 64):
    res[f"broyden split-K {c}"] = lambda c=c: splitk(S, torch.stack((g, s), -1), c)
for name, fn in res.items():
    err = (fn() - ref).abs().max().item()
    print(f"{name:34s} {t(fn):8.1f} us  err {err:.1e}")
coef = torch.randn(B, q, device=dev)
print(f"{'broyden baddbmm w':34s} {t(lambda: torch.baddbmm(g.unsqueeze(1), coef.unsqueeze(1), S, beta=-1)):8.1f} us")
refg = G @ G.mT
gram = {"anderson G @ G.mT": lambda: G @ G.mT, "anderson einsum": lambda: torch.einsum("bpd,brd->bpr", G, G)}
for c in (8, 16, 32, 64):
    gram[f"anderson split-K {c}"] = lambda c=c: splitk(G, G.mT, c)
for name, fn in gram.items():
    print(f"{name:34s} {t(fn):8.1f} us  err {(fn() - refg).abs().max().item():.1e}")

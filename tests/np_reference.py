"""Independent float64 numpy references shared by the tests."""
import numpy as np


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_dino_loss(s, t, c, ts, tt):
    """Loop form: heads, teacher global views g, student views v != g, mean over batch.
    s [H, V, B, K], t [H, G, B, K], c [H, K]."""
    s, t, c = (np.asarray(a, np.float64) for a in (s, t, c))
    h, g, b, k = t.shape
    v = s.shape[1]
    per_head = []
    for hi in range(h):
        terms = []
        for gi in range(g):
            q = np_softmax((t[hi, gi] - c[hi]) / tt)
            for vi in range(v):
                if vi == gi:
                    continue
                terms.append(np.mean(-np.sum(q * np_log_softmax(s[hi, vi] / ts), axis=-1)))
        per_head.append(np.mean(terms))
    return float(np.mean(per_head))

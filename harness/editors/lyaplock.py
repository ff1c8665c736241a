"""LyapLock (arXiv 2505.15702, Eqs. 6-13, Algorithm 1): sequential editing as a long-term
constrained problem.

Per layer, each batch solves in closed form
    min_W'  V * (||W' K - (W K + R)||^2 + sum_prev ||W' k_p - v_p||^2) + q * lambda * D(W')
where D(W') = tr((W' - W0) C0 (W' - W0)^T) is the preservation loss (mean squared change of the
layer's output on generic text) and q = a * Z comes from a virtual queue that grows while D_t
exceeds the threshold alpha * D_base:  Z <- max(Z + a (D_t - alpha D_base) + b, Z_floor).
D_base is the preservation loss after the first batch, which is solved as plain MEMIT (q = V = 1,
no memory). With the defaults a = 1 / sqrt(alpha D_base) and Z0 = Z_floor = sqrt(alpha D_base), so
q starts at 1 and exceeding the threshold by one fold doubles the preservation weight.
"""

from harness.editors.base import Editor
from harness.editors.queue import LyapunovQueue
from harness.editors.solvers import EditMemory, lyaplock_delta


class LyapLockEditor(Editor):
    method = "lyaplock"

    def prepare_state(self):
        if hasattr(self, "queues"):
            return
        hp = self.hp
        self.queues = {
            layer: LyapunovQueue(alpha=hp.alpha, V=hp.lyapunov_v, b=hp.queue_b, z0=hp.queue_z0,
                                 a=hp.queue_a, z_floor=hp.queue_floor)
            for layer in self.layers
        }
        self.memory = {layer: EditMemory(track_values=True, device=self.device) for layer in self.layers}

    def solve_layer(self, i, layer, W, K, R, requests):
        queue, memory = self.queues[layer], self.memory[layer]
        return lyaplock_delta(
            R, K, W, self.W0[layer], self.C0[layer], self.hp.mom2_update_weight,
            q=queue.q, V=queue.edit_weight, S_VK=memory.S_VK, S_KK=memory.S_KK)

    def after_layer(self, i, layer, W_new, K, preservation_loss_value):
        queue = self.queues[layer]
        q_used = queue.q
        queue.observe(preservation_loss_value)
        self.memory[layer].add(K, W_new)
        return {"threshold": queue.threshold, "queue": queue.Z, "q": q_used, "q_next": queue.q,
                "D_base": queue.D_base}

    def extra_state(self):
        return {str(layer): {"queue": self.queues[layer].state_dict(), "memory": self.memory[layer].state_dict()}
                for layer in self.layers}

    def load_extra_state(self, state):
        for layer, s in state.items():
            self.queues[int(layer)].load_state_dict(s["queue"])
            self.memory[int(layer)].load_state_dict(s["memory"])

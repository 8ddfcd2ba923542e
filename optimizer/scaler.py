"""Loss scaling for fp16 (OpenChatKit's semantics: initial 2**15, window 1000, hysteresis 2, min 1).

On an overflow the step is skipped; after `hysteresis` overflows since the last growth the scale halves. After
`window` clean steps in a row it doubles. A static scale (--loss-scale > 0) never changes.
"""


class LossScaler:
    def __init__(self, initial_scale=2.0**15, window=1000, hysteresis=2, min_scale=1.0, static_scale=0.0):
        self.static = static_scale > 0
        self.scale = float(static_scale if self.static else initial_scale)
        self.window = window
        self.hysteresis = hysteresis
        self.min_scale = float(min_scale)
        self.clean_steps = 0
        self.hysteresis_left = hysteresis

    def update(self, overflow):
        if self.static:
            return
        if overflow:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale / 2, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps == self.window:
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis
            self.scale *= 2

    def state_dict(self):
        return {"scale": self.scale, "clean_steps": self.clean_steps, "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, state):
        if self.static:  # this run's --loss-scale is the user's choice now, whatever the checkpoint ran with
            return
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.hysteresis_left = int(state["hysteresis_left"])


class NoScaler:
    """fp32 / bf16: nothing to scale."""

    static = True
    scale = 1.0

    def update(self, overflow):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

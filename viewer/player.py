"""The player: play/pause, speed and frame rate, the step slider and box, follow, and the keyboard."""

from __future__ import annotations

from typing import ClassVar

import panel as pn
import param
from panel.reactive import ReactiveHTML

from weightlapse.viewer.data import DataStore
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tiles import READ_ERRORS

SPEEDS = {"1 step/frame": 1, "10 steps/frame": 10, "100 steps/frame": 100, "1000 steps/frame": 1000}
FRAME_RATES = {"5 fps": 200, "10 fps": 100, "20 fps": 50, "30 fps": 33}
JUMP = 100  # steps moved by shift + arrow


class KeyControl(ReactiveHTML):
    """Keys anywhere on the page (outside text boxes): space plays or pauses, left/right step
    one, shift+left/right jump 100, Home/End go to the first/last step. Also opens the page
    in the dark theme when the browser prefers it and the link names no theme, and reports
    the window's width (the tile grid grows with it)."""

    step = param.Integer(default=0)
    last = param.Integer(default=0)
    playing = param.Boolean(default=False)
    window_width = param.Integer(default=0, doc="the browser window's width, sent on load and after a resize")

    _template = '<div id="keys" style="display:none"></div>'
    _scripts = {
        "render": f"""
            const url = new URL(window.location.href);
            if (!url.searchParams.has('theme') && window.matchMedia &&
                window.matchMedia('(prefers-color-scheme: dark)').matches) {{
              url.searchParams.set('theme', 'dark');
              window.location.replace(url.toString());
            }}
            state.handler = (event) => {{
              const target = event.composedPath()[0] || event.target;
              const tag = (target && target.tagName) || '';
              if (['INPUT', 'TEXTAREA', 'SELECT'].includes(tag) || (target && target.isContentEditable)) return;
              if (target && target.closest && target.closest('.noUi-target')) return;
              let step = data.step;
              const jump = event.shiftKey ? {JUMP} : 1;
              if (event.key === ' ' || event.code === 'Space') {{
                if (tag === 'BUTTON') return;
                event.preventDefault();
                data.playing = !data.playing;
                return;
              }}
              if (event.key === 'ArrowRight') step += jump;
              else if (event.key === 'ArrowLeft') step -= jump;
              else if (event.key === 'Home') step = 0;
              else if (event.key === 'End') step = data.last;
              else return;
              event.preventDefault();
              data.step = Math.max(0, Math.min(data.last, step));
            }};
            document.addEventListener('keydown', state.handler);
            data.window_width = window.innerWidth;
            state.resized = () => {{
              clearTimeout(state.timer);
              state.timer = setTimeout(() => {{ data.window_width = window.innerWidth; }}, 250);
            }};
            window.addEventListener('resize', state.resized);
        """,
        "remove": """
            document.removeEventListener('keydown', state.handler);
            window.removeEventListener('resize', state.resized);
        """,
    }


class FramePlayer(pn.widgets.Player):
    """Panel's Player, its frames handled as they come: Panel holds a widget's change from the
    browser for 50 ms to merge the changes after it, which capped playback near 13 frames a
    second whatever rate was asked."""

    _debounce: ClassVar[int] = 0


class Player(pn.viewable.Viewer):
    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        state = self.state
        # Panel's Player sets its slider's value before its maximum, so a browser clamps a
        # first value above 100 (an HTML range input's default maximum): its value is held
        # at 0 until the page has loaded (go_live).
        self._live = pn.state.curdoc is None
        self.player = FramePlayer(label="Player", start=0, end=1, value=0, loop_policy="once", interval=100,
                                        show_loop_controls=True, show_value=False, width=380,
                                        visible_buttons=["first", "previous", "pause", "play", "next", "last"])
        self.speed = pn.widgets.Select(label="Speed", options=SPEEDS, value=1, width=140)
        self.frame_rate = pn.widgets.Select(label="Frame rate", options=FRAME_RATES, value=100, width=100)
        self.slider = pn.widgets.IntSlider(label="Step", start=0, end=1, value=0, sizing_mode="stretch_width")
        self.step_input = pn.widgets.IntInput(label="Step", value=0, start=0, width=120)
        self.from_input = pn.widgets.IntInput.from_param(state.param.from_step, label="From step", width=120)
        self.start_input = pn.widgets.IntInput.from_param(state.param.range_start, label="First step", width=110)
        self.stop_input = pn.widgets.IntInput.from_param(state.param.range_stop, label="Last step", width=110)
        self.follow = pn.widgets.Checkbox.from_param(state.param.follow, label="Follow newest step")
        self.keys = KeyControl(width=0, height=0, margin=0)
        self.status = pn.pane.HTML("", css_classes=["wl-state"])

        self.player.param.watch(lambda event: self._set_step(event.new), "value")
        self.player.param.watch(lambda event: setattr(state, "playing", event.new != 0), "direction")
        self.slider.param.watch(lambda event: self._set_step(event.new), "value_throttled")
        self.step_input.param.watch(lambda event: self._set_step(event.new), "value")
        self.keys.param.watch(lambda event: self._set_step(event.new), "step")
        self.keys.param.watch(lambda event: setattr(state, "playing", event.new), "playing")
        self.keys.param.watch(lambda event: setattr(state, "window_width", max(int(event.new), 0)), "window_width")
        self.speed.param.watch(lambda event: setattr(self.player, "step", event.new), "value")
        self.frame_rate.param.watch(lambda event: setattr(self.player, "interval", event.new), "value")
        state.param.watch(lambda event: self._show_step(), "step")
        state.param.watch(lambda event: self._show_playing(), "playing")
        state.param.watch(lambda *events: self.update_bounds(), ["run", "revision", "mode", "side_runs"])
        state.param.watch(lambda event: self._show_mode(), "mode")
        self.from_row = pn.Row(self.from_input)
        self._layout = pn.Column(
            pn.Row(self.player, self.speed, self.frame_rate, self.step_input, self.keys),
            self.slider, self.from_row,
            pn.Row(pn.pane.HTML("<b>Step range</b><br><small>statistics, animation</small>", width=110),
                   self.start_input, self.stop_input),
            sizing_mode="stretch_width")
        self.update_bounds()
        self._show_step()
        self._show_mode()

    def __panel__(self):
        return self._layout

    def go_live(self) -> None:
        """The page has loaded: the player may now hold a value above 100."""
        self._live = True
        self.player.value = self.state.step

    def last_step(self) -> int:
        """The newest step of the run, or of the longest run shown side by side (-1: none)."""
        names = self.state.shown_runs() if self.state.mode == "side-by-side" else [self.state.run]
        lasts = [-1]
        for name in filter(None, names):
            try:
                lasts.append(self.store.open(name).last_step)
            except READ_ERRORS:
                continue
        return max(lasts)

    def _set_step(self, value) -> None:
        last = self.last_step()
        if last < 0 or value is None:
            return
        self.state.step = int(min(max(int(value), 0), last))

    def _show_step(self) -> None:
        step = min(self.state.step, max(self.last_step(), 0))
        if self._live and self.player.value != step:
            self.player.value = step
        if self.state.playing:
            # Only the picture moves while playing: each widget updated per frame makes BokehJS
            # lay the page out again (about 50 ms each on 2 cores), which caps playback at a
            # few frames a second. The slider, step box and keys catch up when it pauses.
            return
        if self.slider.value != step:
            self.slider.value = step
        if self.step_input.value != step:
            self.step_input.value = step
        if self.keys.step != step:
            self.keys.step = step

    def _show_playing(self) -> None:
        direction = 1 if self.state.playing else 0
        if self.player.direction != direction:
            self.player.direction = direction
        if self.keys.playing != self.state.playing:
            self.keys.playing = self.state.playing
        if not self.state.playing:
            self._show_step()

    def _show_mode(self) -> None:
        self.from_row.visible = self.state.mode == "step-diff"
        self._layout.visible = self.state.mode != "compare"

    def update_bounds(self) -> None:
        """Bounds from the run as it is now: its newest step."""
        last = max(self.last_step(), 0)
        for widget in (self.player, self.slider):
            widget.end = max(last, 1)  # a slider needs end > start, even for a one-step run
        for widget in (self.step_input, self.from_input, self.start_input, self.stop_input):
            widget.end = last
        self.keys.last = last
        # The state's step is kept even past a run's end for now: a store seen half-written
        # (a run retrained under the page) must not move the step the user chose.
        self._show_step()

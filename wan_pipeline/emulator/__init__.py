"""A local AI/ML API for `alibaba/wan-2-6-i2v`: the same HTTP contract, real mp4s, injectable faults.

It is the pipeline's default peer when no API key is configured, and the peer every test talks to
over loopback HTTP. `app` lists the routes, `config` the knobs, `video` the encoder.

    with running_emulator(EmulatorConfig(latency_s=0.5)) as emu:
        httpx.post(f"{emu.base_url}/v2/video/generations", headers={"Authorization": "Bearer any"}, json=...)

Where the contract is silent, the emulator assumes (and a client must not rely on more):
- 720p costs $0.105/s (1080p is documented at $0.1575/s); credits are charged at create.
- 400 bodies list zod-style issues under `errors`; unknown body keys are ignored; prompts are not
  length-checked (upstream truncates); `duration` may be a numeric string.
- The 429 body carries `statusCode` as the string "429", as in the provider's documented example;
  `Retry-After` (when injected) is in seconds and may be fractional, e.g. "0.5".
- Injected 500/502/503/504 answers on create never create a generation. Three faults do create
  (and charge) one whose answer is lost or ambiguous: `create_drop` (the connection is closed
  without a response), `create_500_after_create` and `create_504_after_create`.
- The provider's limits are not documented beyond "429 Too Many Requests (free tier: hourly
  limit)": a token bucket (`create_rate_limit_per_s`, `create_burst`) answers with a fractional
  `Retry-After` (seconds to the next token), the quota (`create_quota` per fixed
  `create_quota_window_s`) with whole seconds to the window's end; both in the documented 429 body,
  checked atomically with the create after body validation, consuming nothing when they refuse.
- Hostile-server faults: trickled answers (`*_trickle_rate`, `trickle_bytes_per_s`), videos padded
  past any sane size (`oversize_video_bytes`), a key revoked after N creates (`auth_fail_after_creates`).
- `GET /_emulator/info` names the emulator and its version (404 with `identify=False`).
- An http(s) `image_url` cannot be fetched offline: a generated placeholder image is animated
  instead; an http(s) `audio_url` is replaced by a tone.
- A malformed `X-Client-Request-Id` is ignored (not echoed) rather than refused.
- `small_frames=True` (benchmarks) keeps the requested frame size but encodes 2 frames per second.
- Generation ids are random, not seeded, so they stay unique across emulator restarts.
- Statuses follow the wall clock alone (queued, generating, then completed or error at `latency_s`);
  the encode starts at create and a download that arrives before it is done simply waits for it.
"""

from wan_pipeline.emulator.config import EmulatorConfig, FaultConfig, add_cli_arguments, config_from_args
from wan_pipeline.emulator.server import RunningEmulator, running_emulator, serve

__all__ = [
    "EmulatorConfig",
    "FaultConfig",
    "RunningEmulator",
    "add_cli_arguments",
    "config_from_args",
    "running_emulator",
    "serve",
]

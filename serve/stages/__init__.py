"""The stage deployments a job passes through, one Serve deployment per stage so each scales on its own:
text_encoder → denoiser (high, then low; or `colocated`, one deployment for both experts) → decoder →
upscaler → finisher. Each wraps a `pipeline` stage
class unchanged and declares its own default Serve options (`default_options`); their calls and streamed
messages are the dataclasses of `payloads`; `router` keeps same-shape denoise calls on one replica.

Heavy compute runs in worker threads (the engine's, or `asyncio.to_thread`), so a replica's event loop
keeps answering health checks and new calls during minute-long work. Payloads are CPU numpy; decoded
frames (hundreds of MB at 720p) travel as object refs that the next stage resolves itself, so they never
pass through the Scheduler.
"""

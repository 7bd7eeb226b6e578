"""The names of the registered samplers and schedules, without importing torch.

The command line offers them as ``--sampler`` / ``--scheduler`` choices while building its parser,
before torch is imported (``diffstudio --help`` stays fast; diffstudio/threads.py must run first).
The registries themselves are ``diffstudio.sampling.SAMPLERS`` and ``SCHEDULERS``; a test keeps
these tuples equal to them.
"""

SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "lcm")
SCHEDULER_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "flow")

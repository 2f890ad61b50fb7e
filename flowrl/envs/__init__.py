"""gymnasium environments for chunked policies: the action-chunk wrapper and vector envs
(``wrappers``), rollouts and deterministic evaluation of a policy (``rollouts``), and the VLM-RM
CLIP reward on rendered frames (``clip_reward``)."""

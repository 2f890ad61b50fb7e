"""Robot policies: BC-pretrained diffusion and flow-matching policies over action chunks, RL
fine-tuned in gymnasium MuJoCo environments with DPPO and ReinFlow on flowrl's core (the samplers
in flowrl.samplers.ddpm_policy / flowrl.samplers.reinflow, GAE in flowrl.core.gae, the PPO loss
in flowrl.core.losses, the Chain crossing between them).

    flowrl pretrain tasks/robot_inverted_pendulum_reinflow.yaml    # demonstrations + behavior cloning
    flowrl train tasks/robot_inverted_pendulum_reinflow.yaml       # PPO fine-tuning, evaluation, plots
    flowrl evaluate tasks/robot_inverted_pendulum_reinflow.yaml --policy <checkpoint> --guide rlg --rlg-weight 2
                                                                   # evaluation, optionally reward-guided
                                                                   # (flowrl.guidance.robot)

    config.py       the task file's dataclasses (``kind: robot``)
    demos.py        the npz demonstration format; D4RL / robomimic / Minari HDF5 readers
    experts.py      scripted demonstrators (LQR for the pendulums, IK + PD for Reacher)
    policy.py       diffusion and flow policies over action chunks, the noise and value networks
    envs.py         the action-chunk wrapper and vectorized envs
    pretrain.py     behavior cloning
    trainer.py      rollout -> GAE -> PPO (DPPO, ReinFlow), checkpoints and exact resume
    evaluate.py     deterministic evaluation, the learning curve, rollout videos
    clip_reward.py  a CLIP reward on rendered frames (VLM-RM)
"""

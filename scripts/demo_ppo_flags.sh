# The demo's PPO settings, read by scripts/demo.sh (stage 4) and scripts/demo_seeds.sh.
# Room to end: the full answers PPO should learn are 42 tokens on average and up to 59, so a cap of 48
# cut many of them; a cut response is read by the RM mid-sentence, where it scores about as well as
# a finished one, and the policy learnt not to stop. With 96, only a rambling answer reaches the cap,
# and a penalty of 5 (about two standard deviations of this RM's scores) makes not ending cost more
# than any ending gains. See the README, "What you should see".
# The blame off the stop token: an answer that stacks a second "See a doctor if ..." sentence scores low,
# and without the clamp most of that blame lands on its EOS token (the critic cannot yet tell the second
# doctor sentence from the first), so PPO learnt to stop less after every doctor sentence: 3 of 12 seeds
# repeated themselves (no_repeat 0.73-0.93). With it, none of 30 runs fell below 0.95 (27 at 1.000), at the
# price of a slower start (see docs/demo.md, "The fix").
PPO_FLAGS=(--num_updates 20 --batch_size 16 --learning_rate 3e-4 --logging_steps 1
           --response_length 96 --missing_eos_penalty 5 --clamp_stop_advantage)

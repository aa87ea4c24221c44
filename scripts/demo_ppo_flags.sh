# The demo's PPO settings, read by scripts/demo.sh (stage 4) and scripts/demo_seeds.sh.
# Room to end: the full answers PPO should learn are 42 tokens on average and up to 59, so a cap of 48
# cut many of them; a cut response is read by the RM mid-sentence, where it scores about as well as
# a finished one, and the policy learnt not to stop. With 96, only a rambling answer reaches the cap,
# and a penalty of 5 (about two standard deviations of this RM's scores) makes not ending cost more
# than any ending gains. See the README, "What you should see".
PPO_FLAGS=(--num_updates 20 --batch_size 16 --learning_rate 3e-4 --logging_steps 1
           --response_length 96 --missing_eos_penalty 5)

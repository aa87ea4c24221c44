"""The optimiser, the schedule and the order of the data: the parts of a training loop every stage
shares, as small functions the loops call."""

import math

import torch

from nanorlhf import distributed as dist
from nanorlhf.data import IGNORE
from nanorlhf.errors import UserError
from nanorlhf.metrics import check_finite


def make_optimizer(model, lr, weight_decay=0.0):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def warmup_cosine(optimizer, total_steps, warmup_ratio=0.03, min_ratio=0.1):
    """Linear warmup, then cosine decay to min_ratio * lr (as in nanoGPT)."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps(args, batches_per_epoch):
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(batches_per_epoch * args.num_train_epochs / args.gradient_accumulation_steps))


def optimizer_and_schedule(args, model, n_examples, world_size=1):
    """AdamW over what is trained, linear warmup then cosine decay over the run's steps: --max_steps, or
    --num_train_epochs over n_examples in global batches. Returns (steps, optimizer, scheduler)."""
    global_batch = args.per_device_train_batch_size * world_size  # every rank takes per_device of each
    steps = total_steps(args, batches_per_epoch(n_examples, global_batch, world_size))
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay)
    return steps, optimizer, warmup_cosine(optimizer, steps, args.warmup_ratio)


def lm_backward(model, batches, world_size=1):
    """Backward of the next-token loss of one optimizer step: `batches` are this rank's micro-batches
    (dicts of input_ids, labels and optionally attention_mask). Returns the loss, a float.

    The loss is the token mean over the whole accumulated batch of every rank: each micro-batch's
    summed loss is divided by the global count of labelled tokens, and multiplied by the world size
    because DDP averages the ranks' gradients where we want their sum. So a step with gradient
    accumulation, or on several processes, is the same maths as one big batch."""
    n_tokens = dist.sum_over_ranks(sum((b["labels"][:, 1:] != IGNORE).sum().item() for b in batches))
    total = 0.0
    for b in batches:
        loss_sum, _ = lm_forward_loss_sum(model, b)
        (loss_sum / n_tokens * world_size).backward()
        total += loss_sum.item()
    return dist.sum_over_ranks(total) / n_tokens


def optimizer_step(model, optimizer, scheduler, max_grad_norm, step):
    """Clip the gradient norm (and stop on a NaN/inf one, before it reaches the weights), take one
    optimizer step, advance the schedule, clear the gradients."""
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        check_finite(grad_norm.item(), step, "gradient norm")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def batch_order(n, seed, epoch):
    """The shuffled order of the data in one epoch: a pure function of (seed, epoch), so a resumed
    run replays the same order and skips to where it was."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_and_held_out(load, args):
    """(training examples, held-out examples): load(args.data), and load(args.eval_data) when given, else
    --val_size of --data held out (0: none)."""
    train = load(args.data)
    if args.eval_data:
        return train, load(args.eval_data)
    return split_validation(train, args.val_size, args.seed) if args.val_size > 0 else (train, [])


def split_validation(examples, val_size, seed):
    """Hold out round(val_size * N) examples, chosen at random by seed (the same split on every run):
    (train, held out), each in the original order."""
    n_val = max(1, round(val_size * len(examples)))
    if n_val >= len(examples):
        raise UserError(f"--val_size {val_size} leaves no training example ({len(examples)} in all)")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]


def lm_forward_loss_sum(model, batch):
    """lm_loss_sum of `model` on a batch (input_ids, labels, optionally attention_mask), computing only the
    logits from the batch's first labelled token on: an SFT prompt's logits are wasted work (with a 49k-150k
    vocabulary, the output layer and its softmax are a fifth or more of a small model's compute)."""
    labels = batch["labels"]
    labelled = (labels[:, 1:] != IGNORE).any(0).nonzero()  # column t-1 of labels[:, 1:] is token t's label
    keep = labels.size(1) - int(labelled[0]) if len(labelled) else 1  # the logits at t-1 .. end predict t ..
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   logits_to_keep=keep).logits
    return lm_loss_sum(logits, labels[:, -keep:])


def lm_loss_sum(logits, labels):
    """Summed next-token cross entropy over labelled tokens (labels = input_ids, -100 = ignore).

    Returns (sum, count): dividing the sum by the token count of the whole accumulated batch makes
    a step with gradient accumulation the same maths as one big batch."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


def batches_per_epoch(n, batch_size, world_size=1):
    """How many micro-batches micro_batches(n, batch_size, ..., world_size) yields per epoch."""
    return math.ceil((n - n % world_size) / batch_size)


def micro_batches(n, batch_size, seed, skip=0, world_size=1):
    """Endless (epoch, indices) micro-batches over n examples, reshuffled every epoch; the first
    `skip` are passed over (that is how a resumed run finds its place in the data).

    Under torchrun, batch_size is the global micro-batch (per device x world_size) and every epoch
    leaves out its last n % world_size examples (as DistributedSampler(drop_last=True) does), so
    every micro-batch, the last of an epoch included, splits into equal shares over the ranks."""
    used = n - n % world_size
    if used == 0:
        raise UserError(f"{n} examples cannot be shared by {world_size} processes")
    per_epoch = batches_per_epoch(n, batch_size, world_size)
    k = skip
    while True:
        epoch, i = divmod(k, per_epoch)
        order = batch_order(n, seed, epoch)[:used]
        yield epoch, order[i * batch_size:(i + 1) * batch_size]
        k += 1

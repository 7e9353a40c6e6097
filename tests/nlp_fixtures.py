"""Tiny randomly-initialised models for the nlp_project tests, built offline in a few seconds.

build_tiny_models(root) writes the layout nlp_project reads from NLP_APP_MODEL_DIR:
    root/causal-lm      GPT-2 (Radford et al. 2019) with a ChatML chat template
    root/sentiment      DistilBERT sequence classifier, 3 labels (negative / neutral / positive)
    root/qa             DistilBERT extractive QA head
    root/summarization  BART encoder-decoder
    root/image          Stable Diffusion: tiny UNet2DConditionModel + AutoencoderKL + CLIPTextModel
Tokenizers are trained with `tokenizers` on the few sentences below; nothing touches the network.
"""
from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a quiet village by the sea, there lived an old fisherman.",
    "I loved this film, the acting was wonderful. I hated the ending.",
    "The Eiffel Tower was completed in 1889 and stands in Paris, France.",
    "When was the Eiffel Tower completed? Who designed it?",
    "A watercolour painting of a lighthouse at sunset.",
    "Hello! How are you today? I am fine, thank you.",
] * 4

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def _byte_level_bpe(specials: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def build_tiny_models(root: str | Path, with_image: bool = True) -> Path:
    """Create and save_pretrained every tiny model under `root`; returns root as a Path."""
    import torch
    from transformers import (BartConfig, BartForConditionalGeneration, CLIPTextConfig, CLIPTextModel,
                              DistilBertConfig, DistilBertForQuestionAnswering,
                              DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                              PreTrainedTokenizerFast)

    torch.manual_seed(0)
    root = Path(root)

    # GPT-2 with a chat template (so the Chatbot task works) and a short context (to test truncation).
    bpe = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    gpt_tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", model_max_length=128)
    gpt_tok.chat_template = CHATML
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt_tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0))
    gpt.save_pretrained(root / "causal-lm")
    gpt_tok.save_pretrained(root / "causal-lm")

    # DistilBERT classifier (3 labels, cardiffnlp naming) and QA head, sharing one WordPiece tokenizer.
    wp_tok = PreTrainedTokenizerFast(tokenizer_object=_wordpiece(), unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]", model_max_length=64,
                                     model_input_names=["input_ids", "attention_mask"])
    bert_cfg = dict(vocab_size=len(wp_tok), dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64,
                    pad_token_id=0)
    cls = DistilBertForSequenceClassification(DistilBertConfig(
        **bert_cfg, num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2}))
    cls.save_pretrained(root / "sentiment")
    wp_tok.save_pretrained(root / "sentiment")
    qa = DistilBertForQuestionAnswering(DistilBertConfig(**bert_cfg))
    qa.save_pretrained(root / "qa")
    wp_tok.save_pretrained(root / "qa")

    # BART encoder-decoder for summarization.
    from tokenizers import processors

    bart_bpe = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    bart_bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    bart_tok = PreTrainedTokenizerFast(tokenizer_object=bart_bpe, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>", model_max_length=128)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=len(bart_tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=128,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2))
    bart.save_pretrained(root / "summarization")
    bart_tok.save_pretrained(root / "summarization")

    if with_image:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        clip_tok = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(["<|endoftext|>"]),
                                           bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                           pad_token="<|endoftext|>", model_max_length=16)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=0,
            pad_token_id=0))
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=4,
            attention_head_dim=2)
        vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            latent_channels=4, norm_num_groups=4, sample_size=64)
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tok, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(root / "image")
    return root

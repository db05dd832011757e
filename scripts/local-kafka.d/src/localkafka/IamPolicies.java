package localkafka;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.BasicFileAttributes;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.regex.Pattern;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The IAM policies of the local test keys, read from the credentials file the MSK IAM validator
 * reads ({@code iam-keys.properties}), evaluated the way IAM evaluates a policy for MSK: an
 * explicit deny wins, then an allow, and what no statement allows is denied.
 *
 * <p>A key has a policy when the file has at least one line
 * {@code key.<accessKeyId>.policy.<label>=<allow|deny> <actions> <resources>}:
 *
 * <ul>
 *   <li>{@code <label>}: any name, unique per key (properties keys must differ);
 *   <li>{@code <actions>}: comma-separated MSK actions, {@code kafka-cluster:ReadData} or just
 *       {@code ReadData}, with {@code *} and {@code ?} wildcards as in IAM
 *       ({@code kafka-cluster:*}, {@code *Topic}); case-insensitive, as IAM actions are;
 *   <li>{@code <resources>}: comma-separated {@code cluster}, {@code topic/<name>},
 *       {@code group/<name>}, {@code transactional-id/<name>} or {@code *} (everything), names
 *       with {@code *} and {@code ?} wildcards; or a full MSK ARN such as
 *       {@code arn:aws:kafka:us-east-1:123456789012:topic/shop/*}{@code /orders}, whose region,
 *       account, cluster name and cluster UUID are ignored (there is one local cluster).
 * </ul>
 *
 * <p>Keys without a policy line are not restricted at all (the authorizer allows them
 * everything), so only the keys made to test denials are subject to policies.
 */
final class IamPolicies {
    private static final Logger LOG = LoggerFactory.getLogger(IamPolicies.class);
    static final String PREFIX = "kafka-cluster:";
    /** How often the file's modification time is looked at, at most. */
    private static final long STAT_INTERVAL_MS = 250;

    /** An MSK resource: its type ({@code cluster}, {@code topic}, ...) and name. */
    record Resource(String type, String name) {
        @Override
        public String toString() {
            return "cluster".equals(type) ? "cluster" : type + "/" + name;
        }
    }

    /** One policy line. */
    record Statement(boolean allow, List<Pattern> actions, List<ResourcePattern> resources, String text) {
        boolean matchesAction(String action) {
            String lower = action.toLowerCase(Locale.ROOT);
            for (Pattern p : actions) {
                if (p.matcher(lower).matches()) {
                    return true;
                }
            }
            return false;
        }

        boolean matches(String action, Resource resource) {
            if (!matchesAction(action)) {
                return false;
            }
            for (ResourcePattern r : resources) {
                if (r.matches(resource)) {
                    return true;
                }
            }
            return false;
        }
    }

    /** A resource pattern: a type ({@code null} for {@code *}) and a name glob. */
    record ResourcePattern(String type, String glob, Pattern name) {
        boolean matches(Resource resource) {
            return type == null || (type.equals(resource.type()) && name.matcher(resource.name()).matches());
        }

        boolean coversAll() {
            return type == null || "*".equals(glob);
        }

        boolean literal() {
            return type != null && glob.indexOf('*') < 0 && glob.indexOf('?') < 0;
        }
    }

    /** The outcome for one request: why it is allowed or denied, for the broker's log. */
    enum Decision {
        /** The key has no policy: everything is allowed. */
        UNRESTRICTED(true),
        ALLOWED(true),
        /** No statement allows it. */
        IMPLICIT_DENY(false),
        /** A deny statement matches it. */
        EXPLICIT_DENY(false);

        final boolean allowed;

        Decision(boolean allowed) {
            this.allowed = allowed;
        }
    }

    private final Path file;
    private volatile Map<String, List<Statement>> policies = Collections.emptyMap();
    private volatile long checkedAt;
    private long modified = -1;
    private long size = -1;

    IamPolicies(Path file) {
        this.file = file;
    }

    /** Whether the key has a policy at all (keys without one are unrestricted). */
    boolean restricted(String accessKeyId) {
        return current().containsKey(accessKeyId);
    }

    /** Evaluates one action on one resource for a key, as IAM would for MSK. */
    Decision decide(String accessKeyId, String action, Resource resource) {
        return evaluate(current().get(accessKeyId), action, resource);
    }

    /**
     * Evaluates one action on one resource under a key's statements ({@code null}: the key has
     * no policy). Static for the validator, which reads the key file itself at every sign-in.
     */
    static Decision evaluate(List<Statement> statements, String action, Resource resource) {
        if (statements == null) {
            return Decision.UNRESTRICTED;
        }
        if (action == null) {
            return Decision.IMPLICIT_DENY; // no MSK action stands for this Kafka operation
        }
        boolean allowed = false;
        for (Statement s : statements) {
            if (s.matches(action, resource)) {
                if (!s.allow()) {
                    return Decision.EXPLICIT_DENY;
                }
                allowed = true;
            }
        }
        return allowed ? Decision.ALLOWED : Decision.IMPLICIT_DENY;
    }

    /**
     * Whether the key may do {@code action} on at least one resource of {@code type} (Kafka's
     * {@code authorizeByResourceType}, which e.g. lets an idempotent producer without
     * IDEMPOTENT_WRITE start if it may write some topic): some allow statement names the action
     * on a pattern of that type, unless a deny statement covers every resource of the type or
     * denies exactly the one literal name that allow statement names.
     */
    boolean allowedOnSome(String accessKeyId, String action, String type) {
        List<Statement> statements = current().get(accessKeyId);
        if (statements == null) {
            return true;
        }
        if (action == null) {
            return false;
        }
        List<ResourcePattern> denied = new ArrayList<>();
        for (Statement s : statements) {
            if (!s.allow() && s.matchesAction(action)) {
                for (ResourcePattern r : s.resources()) {
                    if (r.type() == null || r.type().equals(type)) {
                        if (r.coversAll()) {
                            return false;
                        }
                        denied.add(r);
                    }
                }
            }
        }
        for (Statement s : statements) {
            if (!s.allow() || !s.matchesAction(action)) {
                continue;
            }
            for (ResourcePattern r : s.resources()) {
                if (r.type() != null && !r.type().equals(type)) {
                    continue;
                }
                if (!r.literal()) {
                    return true;
                }
                Resource one = new Resource(type, r.glob());
                if (denied.stream().noneMatch(d -> d.matches(one))) {
                    return true;
                }
            }
        }
        return false;
    }

    private Map<String, List<Statement>> current() {
        long now = System.currentTimeMillis();
        if (now - checkedAt >= STAT_INTERVAL_MS) {
            reloadIfChanged(now);
        }
        return policies;
    }

    /** Re-reads the file when its modification time or size changed (the script rewrites it at
     * every start; a test may too). A file that cannot be read or parsed keeps the last good
     * policies, and says so in the broker's log. */
    private synchronized void reloadIfChanged(long now) {
        if (now - checkedAt < STAT_INTERVAL_MS) {
            return;
        }
        checkedAt = now;
        try {
            BasicFileAttributes attrs = Files.readAttributes(file, BasicFileAttributes.class);
            long m = attrs.lastModifiedTime().toMillis();
            if (m == modified && attrs.size() == size) {
                return;
            }
            Properties props = new Properties();
            try (InputStream in = Files.newInputStream(file)) {
                props.load(in);
            }
            policies = parse(props);
            modified = m;
            size = attrs.size();
            LOG.info("IAM policies loaded from {} for keys {}", file, policies.keySet());
        } catch (IOException | IllegalArgumentException e) {
            LOG.error("cannot load IAM policies from {}: {}", file, e.getMessage());
        }
    }

    static Map<String, List<Statement>> parse(Properties props) {
        Map<String, List<Statement>> out = new HashMap<>();
        for (String name : props.stringPropertyNames()) {
            if (!name.startsWith("key.")) {
                continue;
            }
            int at = name.indexOf(".policy.");
            if (at < 0) {
                continue;
            }
            String key = name.substring("key.".length(), at);
            String line = props.getProperty(name).trim();
            out.computeIfAbsent(key, k -> new ArrayList<>()).add(statement(name, line));
        }
        return out;
    }

    private static Statement statement(String name, String line) {
        String[] parts = line.split("\\s+");
        if (parts.length != 3) {
            throw new IllegalArgumentException(name + ": expected '<allow|deny> <actions> <resources>', got '" + line + "'");
        }
        boolean allow;
        if ("allow".equalsIgnoreCase(parts[0])) {
            allow = true;
        } else if ("deny".equalsIgnoreCase(parts[0])) {
            allow = false;
        } else {
            throw new IllegalArgumentException(name + ": effect must be allow or deny, not '" + parts[0] + "'");
        }
        List<Pattern> actions = new ArrayList<>();
        for (String action : parts[1].split(",")) {
            String a = action.trim();
            if (a.isEmpty()) {
                continue;
            }
            if (!a.contains(":")) {
                a = PREFIX + a;
            }
            actions.add(glob(a.toLowerCase(Locale.ROOT)));
        }
        List<ResourcePattern> resources = new ArrayList<>();
        for (String resource : parts[2].split(",")) {
            String r = resource.trim();
            if (!r.isEmpty()) {
                resources.add(resourcePattern(name, r));
            }
        }
        if (actions.isEmpty() || resources.isEmpty()) {
            throw new IllegalArgumentException(name + ": no action or no resource in '" + line + "'");
        }
        return new Statement(allow, List.copyOf(actions), List.copyOf(resources), line);
    }

    private static ResourcePattern resourcePattern(String name, String text) {
        if ("*".equals(text)) {
            return new ResourcePattern(null, "*", glob("*"));
        }
        String r = text;
        boolean arn = r.startsWith("arn:");
        if (arn) {
            // arn:aws:kafka:<region>:<account>:<type>/<cluster-name>/<cluster-uuid>[/<name>]
            String[] fields = r.split(":", 6);
            if (fields.length != 6 || !"kafka".equals(fields[2])) {
                throw new IllegalArgumentException(name + ": not an MSK ARN: " + text);
            }
            r = fields[5];
        }
        int slash = r.indexOf('/');
        String type = slash < 0 ? r : r.substring(0, slash);
        String rest = slash < 0 ? "" : r.substring(slash + 1);
        switch (type) {
            case "cluster":
                return new ResourcePattern("cluster", "*", glob("*"));
            case "topic":
            case "group":
            case "transactional-id":
                break;
            default:
                throw new IllegalArgumentException(name + ": unknown resource type in " + text);
        }
        if (arn) {
            String[] fields = rest.split("/", 3); // cluster name, cluster uuid, resource name
            if (fields.length != 3) {
                throw new IllegalArgumentException(name + ": " + text + " has no <cluster>/<uuid>/<name>");
            }
            rest = fields[2];
        }
        if (rest.isEmpty()) {
            throw new IllegalArgumentException(name + ": no name in " + text + " (use " + type + "/*)");
        }
        return new ResourcePattern(type, rest, glob(rest));
    }

    /** IAM wildcards: {@code *} any run of characters, {@code ?} one character. */
    static Pattern glob(String glob) {
        StringBuilder re = new StringBuilder();
        StringBuilder literal = new StringBuilder();
        for (char c : glob.toCharArray()) {
            if (c == '*' || c == '?') {
                if (literal.length() > 0) {
                    re.append(Pattern.quote(literal.toString()));
                    literal.setLength(0);
                }
                re.append(c == '*' ? ".*" : ".");
            } else {
                literal.append(c);
            }
        }
        if (literal.length() > 0) {
            re.append(Pattern.quote(literal.toString()));
        }
        return Pattern.compile(re.toString(), Pattern.DOTALL);
    }
}

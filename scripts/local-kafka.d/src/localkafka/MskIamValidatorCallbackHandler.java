package localkafka;

import java.io.IOException;
import java.io.InputStream;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.time.Instant;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.time.format.DateTimeParseException;
import java.util.Base64;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.TreeMap;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import javax.security.auth.callback.Callback;
import javax.security.auth.callback.UnsupportedCallbackException;
import javax.security.auth.login.AppConfigurationEntry;
import org.apache.kafka.common.security.auth.AuthenticateCallbackHandler;
import org.apache.kafka.common.security.oauthbearer.OAuthBearerExtensionsValidatorCallback;
import org.apache.kafka.common.security.oauthbearer.OAuthBearerToken;
import org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallback;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Validates AWS MSK IAM tokens on an OAUTHBEARER listener, the way MSK does, so the sidecar's
 * IAM path is tested against a real broker rather than a mock.
 *
 * <p>A token is the base64url form of a SigV4 presigned GET URL for
 * {@code https://kafka.<region>.amazonaws.com/?Action=kafka-cluster:Connect&...}. The signature is
 * recomputed with the secret of the access key named in {@code X-Amz-Credential}, read from a
 * local credentials file (this is a test broker: there is no IAM to ask). {@code User-Agent} is
 * appended by the signer after signing, so it is not part of the canonical request. The token's
 * expiry becomes the session lifetime, which the broker enforces when
 * {@code connections.max.reauth.ms} is positive: clients without KIP-368 re-authentication (such
 * as aiokafka) are then disconnected when it ends, as on MSK.
 *
 * <p>Credentials file (java properties): {@code key.<accessKeyId>.secret=<secret>} and optionally
 * {@code key.<accessKeyId>.max_session_ms=<ms>} to cap the sessions of that key, so one broker can
 * serve both normal and short-session clients.
 *
 * <p>Keys with policy lines (see {@link IamPolicies}) must be allowed {@code kafka-cluster:Connect}
 * on the cluster to sign in at all, as on MSK.
 *
 * <p>JAAS options: {@code credentialsFile} (required), {@code region} (required).
 */
public final class MskIamValidatorCallbackHandler implements AuthenticateCallbackHandler {
    private static final Logger LOG = LoggerFactory.getLogger(MskIamValidatorCallbackHandler.class);
    private static final String SERVICE = "kafka-cluster";
    private static final String ACTION = "kafka-cluster:Connect";
    private static final String ALGORITHM = "AWS4-HMAC-SHA256";
    private static final long MAX_CLOCK_SKEW_MS = 5 * 60 * 1000L;
    private static final DateTimeFormatter AMZ_DATE =
            DateTimeFormatter.ofPattern("yyyyMMdd'T'HHmmss'Z'").withZone(ZoneOffset.UTC);

    private Path credentialsFile;
    private String region;

    @Override
    public void configure(Map<String, ?> configs, String saslMechanism, List<AppConfigurationEntry> jaasConfigEntries) {
        Map<String, ?> options = jaasConfigEntries.get(0).getOptions();
        Object file = options.get("credentialsFile");
        Object reg = options.get("region");
        if (file == null || reg == null) {
            throw new IllegalArgumentException("MskIamValidatorCallbackHandler needs JAAS options credentialsFile and region");
        }
        credentialsFile = Path.of(file.toString());
        region = reg.toString();
    }

    @Override
    public void close() {}

    @Override
    public void handle(Callback[] callbacks) throws IOException, UnsupportedCallbackException {
        for (Callback callback : callbacks) {
            if (callback instanceof OAuthBearerValidatorCallback) {
                OAuthBearerValidatorCallback cb = (OAuthBearerValidatorCallback) callback;
                try {
                    cb.token(validate(cb.tokenValue()));
                } catch (InvalidToken e) {
                    LOG.info("MSK IAM token rejected: {}", e.getMessage());
                    // Not cb.error(): that answers with an RFC 7628 error challenge, which
                    // aiokafka's OAUTHBEARER client takes for success (it then sends a request,
                    // and the broker drops the connection). An exception makes the broker answer
                    // SASL_AUTHENTICATION_FAILED at once, which every client reports as such.
                    throw new IOException("invalid MSK IAM token: " + e.getMessage());
                }
            } else if (callback instanceof OAuthBearerExtensionsValidatorCallback) {
                // MSK ignores client SASL extensions; leaving them unvalidated drops them.
                continue;
            } else {
                throw new UnsupportedCallbackException(callback);
            }
        }
    }

    private static final class InvalidToken extends Exception {
        InvalidToken(String message) {
            super(message);
        }
    }

    private OAuthBearerToken validate(String tokenValue) throws InvalidToken {
        String url;
        try {
            url = new String(Base64.getUrlDecoder().decode(stripPadding(tokenValue)), StandardCharsets.UTF_8);
        } catch (IllegalArgumentException e) {
            throw new InvalidToken("token is not base64url");
        }
        URI uri;
        try {
            uri = new URI(url);
        } catch (Exception e) {
            throw new InvalidToken("token is not a URL");
        }
        String expectedHost = "kafka." + region + ".amazonaws.com";
        if (!"https".equals(uri.getScheme()) || !expectedHost.equals(uri.getHost())) {
            throw new InvalidToken("token is not for " + expectedHost);
        }
        if (uri.getRawPath() != null && !uri.getRawPath().isEmpty() && !"/".equals(uri.getRawPath())) {
            throw new InvalidToken("unexpected path");
        }
        Map<String, String> params = parseQuery(uri.getRawQuery());
        if (!ACTION.equals(params.get("Action"))) {
            throw new InvalidToken("Action is not " + ACTION);
        }
        if (!ALGORITHM.equals(params.get("X-Amz-Algorithm"))) {
            throw new InvalidToken("unsupported X-Amz-Algorithm");
        }
        if (!"host".equals(params.get("X-Amz-SignedHeaders"))) {
            throw new InvalidToken("X-Amz-SignedHeaders must be host");
        }
        String credential = require(params, "X-Amz-Credential");
        String amzDate = require(params, "X-Amz-Date");
        String expiresText = require(params, "X-Amz-Expires");
        String signature = require(params, "X-Amz-Signature");

        String[] scopeParts = credential.split("/", -1);
        if (scopeParts.length != 5 || !region.equals(scopeParts[2]) || !SERVICE.equals(scopeParts[3])
                || !"aws4_request".equals(scopeParts[4])) {
            throw new InvalidToken("bad credential scope");
        }
        String accessKeyId = scopeParts[0];
        if (!amzDate.startsWith(scopeParts[1])) {
            throw new InvalidToken("credential scope date does not match X-Amz-Date");
        }
        Properties keys = loadKeys();
        String secret = keys.getProperty("key." + accessKeyId + ".secret");
        if (secret == null) {
            throw new InvalidToken("unknown access key " + accessKeyId);
        }

        long signedAtMs;
        long expiresMs;
        try {
            signedAtMs = Instant.from(AMZ_DATE.parse(amzDate)).toEpochMilli();
            expiresMs = Long.parseLong(expiresText) * 1000L;
        } catch (DateTimeParseException | NumberFormatException e) {
            throw new InvalidToken("bad X-Amz-Date or X-Amz-Expires");
        }
        if (expiresMs <= 0 || expiresMs > 7 * 24 * 3600 * 1000L) {
            throw new InvalidToken("X-Amz-Expires out of range");
        }
        long now = System.currentTimeMillis();
        long expiryMs = signedAtMs + expiresMs;
        if (now >= expiryMs) {
            throw new InvalidToken("token expired");
        }
        if (signedAtMs > now + MAX_CLOCK_SKEW_MS) {
            throw new InvalidToken("token signed in the future");
        }

        TreeMap<String, String> signed = new TreeMap<>();
        for (Map.Entry<String, String> e : params.entrySet()) {
            if (!e.getKey().equals("X-Amz-Signature") && !e.getKey().equals("User-Agent")) {
                signed.put(awsEncode(e.getKey()), awsEncode(e.getValue()));
            }
        }
        StringBuilder canonicalQuery = new StringBuilder();
        for (Map.Entry<String, String> e : signed.entrySet()) {
            if (canonicalQuery.length() > 0) {
                canonicalQuery.append('&');
            }
            canonicalQuery.append(e.getKey()).append('=').append(e.getValue());
        }
        String canonicalRequest = String.join("\n",
                "GET", "/", canonicalQuery.toString(), "host:" + expectedHost + "\n", "host", sha256Hex(new byte[0]));
        String scope = String.join("/", scopeParts[1], scopeParts[2], scopeParts[3], scopeParts[4]);
        String stringToSign = String.join("\n",
                ALGORITHM, amzDate, scope, sha256Hex(canonicalRequest.getBytes(StandardCharsets.UTF_8)));
        byte[] key = ("AWS4" + secret).getBytes(StandardCharsets.UTF_8);
        for (int i = 1; i < 5; i++) {
            key = hmac(key, scopeParts[i]);
        }
        String expected = hex(hmac(key, stringToSign));
        if (!MessageDigest.isEqual(expected.getBytes(StandardCharsets.US_ASCII),
                signature.getBytes(StandardCharsets.US_ASCII))) {
            throw new InvalidToken("signature mismatch for access key " + accessKeyId);
        }

        // As on MSK, a role whose policy does not allow kafka-cluster:Connect on the cluster
        // cannot sign in at all, whatever else it may do: "Access denied" at authentication.
        IamPolicies.Decision connect;
        try {
            connect = IamPolicies.evaluate(
                    IamPolicies.parse(keys).get(accessKeyId), ACTION, new IamPolicies.Resource("cluster", ""));
        } catch (IllegalArgumentException e) {
            throw new InvalidToken("Access denied: unreadable policy: " + e.getMessage());
        }
        if (!connect.allowed) {
            throw new InvalidToken("Access denied: the policy of " + accessKeyId + " does not allow "
                    + ACTION + " on the cluster (" + connect + ")");
        }

        long lifetimeMs = expiryMs;
        String maxSession = keys.getProperty("key." + accessKeyId + ".max_session_ms");
        if (maxSession != null) {
            lifetimeMs = Math.min(lifetimeMs, now + Long.parseLong(maxSession.trim()));
        }
        LOG.debug("MSK IAM token accepted for {} (session until {})", accessKeyId, lifetimeMs);
        return new Token(tokenValue, accessKeyId, signedAtMs, lifetimeMs);
    }

    private Properties loadKeys() throws InvalidToken {
        // Read on every authentication so the script can rotate keys without a broker restart.
        Properties keys = new Properties();
        try (InputStream in = Files.newInputStream(credentialsFile)) {
            keys.load(in);
        } catch (IOException e) {
            LOG.error("cannot read credentials file {}", credentialsFile, e);
            throw new InvalidToken("credentials file unreadable");
        }
        return keys;
    }

    private static String require(Map<String, String> params, String name) throws InvalidToken {
        String value = params.get(name);
        if (value == null || value.isEmpty()) {
            throw new InvalidToken("missing " + name);
        }
        return value;
    }

    private static String stripPadding(String s) {
        int end = s.length();
        while (end > 0 && s.charAt(end - 1) == '=') {
            end--;
        }
        return s.substring(0, end);
    }

    private static Map<String, String> parseQuery(String rawQuery) throws InvalidToken {
        if (rawQuery == null || rawQuery.isEmpty()) {
            throw new InvalidToken("no query string");
        }
        Map<String, String> params = new HashMap<>();
        for (String pair : rawQuery.split("&")) {
            int eq = pair.indexOf('=');
            String k = percentDecode(eq < 0 ? pair : pair.substring(0, eq));
            String v = eq < 0 ? "" : percentDecode(pair.substring(eq + 1));
            if (params.put(k, v) != null) {
                throw new InvalidToken("duplicate query parameter " + k);
            }
        }
        return params;
    }

    private static String percentDecode(String s) throws InvalidToken {
        byte[] out = new byte[s.length()];
        int n = 0;
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '%') {
                if (i + 2 >= s.length()) {
                    throw new InvalidToken("bad percent-encoding");
                }
                int hi = Character.digit(s.charAt(i + 1), 16);
                int lo = Character.digit(s.charAt(i + 2), 16);
                if (hi < 0 || lo < 0) {
                    throw new InvalidToken("bad percent-encoding");
                }
                out[n++] = (byte) ((hi << 4) | lo);
                i += 2;
            } else {
                out[n++] = (byte) c;
            }
        }
        return new String(out, 0, n, StandardCharsets.UTF_8);
    }

    /** SigV4 URI encoding: everything but A-Z a-z 0-9 - _ . ~ is %XX (upper case). */
    private static String awsEncode(String s) {
        StringBuilder sb = new StringBuilder();
        for (byte b : s.getBytes(StandardCharsets.UTF_8)) {
            char c = (char) (b & 0xff);
            if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
                    || c == '-' || c == '_' || c == '.' || c == '~') {
                sb.append(c);
            } else {
                sb.append('%').append(Character.toUpperCase(Character.forDigit((b >> 4) & 0xf, 16)))
                        .append(Character.toUpperCase(Character.forDigit(b & 0xf, 16)));
            }
        }
        return sb.toString();
    }

    private static byte[] hmac(byte[] key, String data) {
        try {
            Mac mac = Mac.getInstance("HmacSHA256");
            mac.init(new SecretKeySpec(key, "HmacSHA256"));
            return mac.doFinal(data.getBytes(StandardCharsets.UTF_8));
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
    }

    private static String sha256Hex(byte[] data) {
        try {
            return hex(MessageDigest.getInstance("SHA-256").digest(data));
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
    }

    private static String hex(byte[] bytes) {
        StringBuilder sb = new StringBuilder(bytes.length * 2);
        for (byte b : bytes) {
            sb.append(Character.forDigit((b >> 4) & 0xf, 16)).append(Character.forDigit(b & 0xf, 16));
        }
        return sb.toString();
    }

    private static final class Token implements OAuthBearerToken {
        private final String value;
        private final String principal;
        private final long startMs;
        private final long lifetimeMs;

        Token(String value, String principal, long startMs, long lifetimeMs) {
            this.value = value;
            this.principal = principal;
            this.startMs = startMs;
            this.lifetimeMs = lifetimeMs;
        }

        @Override
        public String value() {
            return value;
        }

        @Override
        public Set<String> scope() {
            return Collections.emptySet();
        }

        @Override
        public long lifetimeMs() {
            return lifetimeMs;
        }

        @Override
        public String principalName() {
            return principal;
        }

        @Override
        public Long startTimeMs() {
            return startMs;
        }
    }
}

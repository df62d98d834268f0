/*
 * saveit-wal-push: the native front of `saveit-backup wal-push` for archive_command in async mode.
 *
 *   archive_command = 'saveit-wal-push --async %p'
 *
 * It takes exactly the arguments of `saveit-backup wal-push`. PostgreSQL starts one process per WAL
 * file; a Python interpreter costs about 13 ms of CPU to start here, this program about 1 ms. It
 * answers only the common case of async mode (src/saveit_backup/ops/wal_spool.py, `acknowledged`,
 * which it mirrors): the background worker has pushed the file, now or while this call waits for
 * the running worker. Everything else (sync mode, no worker running, an error, a dropped file,
 * --verbose, a config file that sets the spool or async mode, arguments it does not know, the wait
 * timing out) is handed to `saveit-backup wal-push` with the same arguments, found next to this
 * program (else on PATH), which decides and reports. After a wait, SAVEIT_WAITED_SINCE (seconds of
 * CLOCK_MONOTONIC) tells it when the wait began, so --timeout counts from there.
 *
 * Spool layout: see ops/wal_async.py. The default spool is /var/tmp/saveit-spool-<first 12 hex
 * digits of SHA-256 of realpath(pg_wal)>, hashed with OpenSSL's libcrypto, which is loaded only then
 * (loading it costs about 1 ms, half of this program's run; BACKUP_SPOOL_DIR set needs no hash).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FAST_WAIT 10.0     /* at most this much of --timeout is waited here (wal_spool.FAST_WAIT) */
#define POLL_NS 2000000L   /* look for the ack every 2 ms */
#define WORKER_CHECK 0.1   /* is the worker still running: every 100 ms */
#define DEFAULT_TIMEOUT 60.0

static char **saved_argv;
static int saved_argc;

/* Hand the call to `saveit-backup wal-push` with the original arguments; never returns. */
static void hand_over(double waited_since) {
    char self[PATH_MAX], target[PATH_MAX + 32];
    char **args = calloc((size_t)saved_argc + 2, sizeof(char *));
    if (args == NULL) {
        perror("saveit-wal-push");
        exit(1);
    }
    args[0] = "saveit-backup";
    args[1] = "wal-push";
    for (int i = 1; i < saved_argc; i++)
        args[i + 1] = saved_argv[i];
    if (waited_since >= 0) {
        char value[64];
        snprintf(value, sizeof value, "%.6f", waited_since);
        setenv("SAVEIT_WAITED_SINCE", value, 1);
    } else {
        unsetenv("SAVEIT_WAITED_SINCE"); /* only this program tells the full command it waited */
    }
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash != NULL) {
            *slash = '\0';
            snprintf(target, sizeof target, "%s/saveit-backup", self);
            if (access(target, X_OK) == 0)
                execv(target, args);
        }
    }
    execvp("saveit-backup", args);
    fprintf(stderr, "saveit-wal-push: ERROR cannot run saveit-backup: %s (install saveit-backup in the same directory or on PATH)\n",
            strerror(errno));
    exit(1);
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int truthy(const char *value) {
    if (value == NULL)
        return 0;
    while (*value == ' ' || *value == '\t' || *value == '\n')
        value++;
    size_t len = strlen(value);
    while (len > 0 && (value[len - 1] == ' ' || value[len - 1] == '\t' || value[len - 1] == '\n'))
        len--;
    static const char *yes[] = {"1", "true", "yes", "on"};
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++)
        if (len == strlen(yes[i]) && strncasecmp(value, yes[i], len) == 0)
            return 1;
    return 0;
}

/* Python's os.path.abspath: joined with the working directory, ".", ".." and repeated slashes removed. */
static int abspath(const char *path, char *out, size_t size) {
    char joined[PATH_MAX * 2];
    if (path[0] == '/') {
        if (snprintf(joined, sizeof joined, "%s", path) >= (int)sizeof joined)
            return -1;
    } else {
        char cwd[PATH_MAX];
        if (getcwd(cwd, sizeof cwd) == NULL)
            return -1;
        if (snprintf(joined, sizeof joined, "%s/%s", cwd, path) >= (int)sizeof joined)
            return -1;
    }
    size_t len = 0;
    out[0] = '\0';
    for (char *part = strtok(joined, "/"); part != NULL; part = strtok(NULL, "/")) {
        if (strcmp(part, ".") == 0)
            continue;
        if (strcmp(part, "..") == 0) {
            char *slash = strrchr(out, '/');
            len = slash ? (size_t)(slash - out) : 0;
            out[len] = '\0';
            continue;
        }
        size_t plen = strlen(part);
        if (len + plen + 2 > size)
            return -1;
        out[len++] = '/';
        memcpy(out + len, part, plen + 1);
        len += plen;
    }
    if (len == 0) {
        if (size < 2)
            return -1;
        strcpy(out, "/");
    }
    return 0;
}

#define STRINGIFY(x) #x
#define VERSION_TEXT(x) STRINGIFY(x)

static int sha256(const char *text, unsigned char *digest, unsigned int *dlen) {
    void *lib = dlopen("libcrypto.so." VERSION_TEXT(OPENSSL_SHLIB_VERSION), RTLD_LAZY | RTLD_LOCAL);
    if (lib == NULL)
        return -1;
    typeof(EVP_sha256) *sha256_md = (typeof(EVP_sha256) *)dlsym(lib, "EVP_sha256");
    typeof(EVP_Digest) *digest_fn = (typeof(EVP_Digest) *)dlsym(lib, "EVP_Digest");
    if (sha256_md == NULL || digest_fn == NULL)
        return -1;
    return digest_fn(text, strlen(text), digest, dlen, sha256_md(), NULL) ? 0 : -1;
}

static int default_spool(const char *pg_wal, char *out, size_t size) {
    char real[PATH_MAX];
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    if (realpath(pg_wal, real) == NULL)
        return -1;
    if (sha256(real, digest, &dlen) != 0 || dlen < 6)
        return -1;
    int n = snprintf(out, size, "/var/tmp/saveit-spool-%02x%02x%02x%02x%02x%02x", digest[0], digest[1], digest[2], digest[3],
                     digest[4], digest[5]);
    return n > 0 && (size_t)n < size ? 0 : -1;
}

enum ack { NO_ACK, PUSHED, OTHER };

/* status/<name>.ok as the worker writes it: PUSHED for "stored" or "exists"; OTHER (a drop, or anything
 * else) is left to the full command. */
static enum ack ack(const char *ok_path) {
    char text[64];
    int fd = open(ok_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NO_ACK;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n < 0)
        return OTHER;
    text[n] = '\0';
    return strcmp(text, "stored") == 0 || strcmp(text, "exists") == 0 ? PUSHED : OTHER;
}

static int worker_running(const char *lock_path) {
    int fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return 0;
    int held = flock(fd, LOCK_EX | LOCK_NB) != 0;
    close(fd); /* closing releases a lock we may have taken */
    return held;
}

/* wal_spool.write_atomic: a temporary file renamed over the request. */
static int write_request(const char *requests, const char *name, const char *path) {
    char tmp[PATH_MAX + 96], final[PATH_MAX + 32];
    snprintf(final, sizeof final, "%s/%s", requests, name);
    snprintf(tmp, sizeof tmp, "%s.%d.%lu.tmp", final, (int)getpid(), (unsigned long)pthread_self());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0)
        return -1;
    size_t len = strlen(path);
    int ok = write(fd, path, len) == (ssize_t)len;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, final) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* wal_args.quick_args for wal-push: 0 when parsed, -1 for anything argparse must see. */
static int parse(int argc, char **argv, int *async_, double *timeout, const char **config, const char **path) {
    int positional = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0) {
            positional += argc - i - 1;
            if (argc - i - 1 == 1)
                *path = argv[i + 1];
            break;
        }
        if (arg[0] != '-' || strcmp(arg, "-") == 0) {
            positional++;
            *path = arg;
            continue;
        }
        const char *eq = strchr(arg, '=');
        size_t flen = eq ? (size_t)(eq - arg) : strlen(arg);
        if (flen == 7 && strncmp(arg, "--async", 7) == 0) {
            if (eq)
                return -1;
            *async_ = 1;
            continue;
        }
        const char *value;
        int is_timeout = flen == 9 && strncmp(arg, "--timeout", 9) == 0;
        int is_config = flen == 8 && strncmp(arg, "--config", 8) == 0;
        int is_repo = flen == 6 && strncmp(arg, "--repo", 6) == 0;
        if (!is_timeout && !is_config && !is_repo)
            return -1; /* --verbose, -v, --help, unknown: the full command */
        if (eq) {
            value = eq + 1;
        } else {
            if (i + 1 >= argc)
                return -1;
            value = argv[++i];
        }
        if (is_timeout) {
            char *end;
            errno = 0;
            *timeout = strtod(value, &end);
            if (errno || end == value || *end != '\0')
                return -1;
        } else if (is_config) {
            *config = value;
        }
    }
    return positional == 1 ? 0 : -1;
}

int main(int argc, char **argv) {
    saved_argc = argc;
    saved_argv = argv;
    int async_ = 0;
    double timeout = DEFAULT_TIMEOUT;
    const char *config = NULL, *path_arg = NULL;
    if (parse(argc, argv, &async_, &timeout, &config, &path_arg) != 0)
        hand_over(-1);
    int use_async = async_ || truthy(getenv("BACKUP_ARCHIVE_ASYNC"));
    if (config == NULL || config[0] == '\0')
        config = getenv("BACKUP_CONFIG");
    const char *spool_dir = getenv("BACKUP_SPOOL_DIR");
    if (config != NULL && config[0] != '\0' && (spool_dir == NULL || !use_async)) {
        /* A config file may set the spool or async mode: then the full command reads it. */
        static char text[1 << 16];
        int fd = open(config, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            hand_over(-1);
        ssize_t n = read(fd, text, sizeof text - 1);
        close(fd);
        if (n < 0 || n == (ssize_t)sizeof text - 1 || memchr(text, '\0', (size_t)n) != NULL)
            hand_over(-1); /* unreadable, larger than any config, or not text: the full command decides */
        text[n] = '\0';
        if ((spool_dir == NULL && strstr(text, "spool_dir")) || (!use_async && strstr(text, "archive_async")))
            hand_over(-1);
    }
    if (!use_async)
        hand_over(-1);

    char path[PATH_MAX], pg_wal[PATH_MAX], root[PATH_MAX];
    if (abspath(path_arg, path, sizeof path) != 0)
        hand_over(-1);
    char *slash = strrchr(path, '/');
    const char *name = slash + 1;
    if (name[0] == '\0' || name[0] == '.')
        hand_over(-1);
    if (slash == path)
        strcpy(pg_wal, "/");
    else
        snprintf(pg_wal, sizeof pg_wal, "%.*s", (int)(slash - path), path);
    if (spool_dir != NULL && spool_dir[0] != '\0' ? abspath(spool_dir, root, sizeof root) : default_spool(pg_wal, root, sizeof root))
        hand_over(-1);

    char ok_path[PATH_MAX + 64], error_path[PATH_MAX + 64], request[PATH_MAX + 64], requests[PATH_MAX + 8], lock_path[PATH_MAX + 16];
    snprintf(ok_path, sizeof ok_path, "%s/status/%s.ok", root, name);
    snprintf(error_path, sizeof error_path, "%s/status/%s.error", root, name);
    snprintf(requests, sizeof requests, "%s/in", root);
    snprintf(request, sizeof request, "%s/%s", requests, name);
    snprintf(lock_path, sizeof lock_path, "%s/worker.lock", root);

    enum ack status = ack(ok_path);
    double waited_since = -1;
    struct stat st;
    if (status == NO_ACK && stat(requests, &st) == 0 && S_ISDIR(st.st_mode) && worker_running(lock_path)) {
        waited_since = monotonic();
        double deadline = waited_since + (timeout < FAST_WAIT ? timeout : FAST_WAIT);
        double next_check = waited_since + WORKER_CHECK;
        unlink(error_path); /* an earlier attempt's failure: wait for a fresh one */
        if (write_request(requests, name, path) != 0)
            hand_over(waited_since);
        for (;;) {
            struct timespec pause = {0, POLL_NS};
            nanosleep(&pause, NULL);
            status = ack(ok_path);
            if (status != NO_ACK || access(error_path, F_OK) == 0)
                break;
            double now = monotonic();
            if (now >= deadline)
                break;
            if (now >= next_check) {
                if (!worker_running(lock_path)) {
                    status = ack(ok_path);
                    break;
                }
                next_check = now + WORKER_CHECK;
            }
        }
    }
    if (status != PUSHED)
        hand_over(waited_since); /* reports an error or a drop, or starts a worker and waits */
    unlink(request);
    return 0;
}

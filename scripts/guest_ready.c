/* Tell Incus from inside a container that the guest is ready: PATCH /1.0 {"state":"Ready"} on
 * the guest API socket /dev/incus/sock. The instance's status then turns from Running to Ready.
 *
 * Build (static, so it runs in the busybox lab image):  gcc -static -Os -o guest_ready guest_ready.c
 * Use:  incus file push guest_ready INSTANCE/guest_ready --mode 0755
 *       incus exec INSTANCE -- /guest_ready [STATE]      (STATE defaults to Ready; Started undoes it)
 * Prints the reply; exits 0 on an HTTP 200 answer, 1 otherwise.
 */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define SOCKET_PATH "/dev/incus/sock"

int main(int argc, char **argv) {
    const char *state = argc > 1 ? argv[1] : "Ready";
    char body[128], request[512], reply[4096];
    int body_len = snprintf(body, sizeof body, "{\"state\":\"%s\"}", state);
    int len = snprintf(request, sizeof request,
                       "PATCH /1.0 HTTP/1.0\r\nHost: localhost\r\n"
                       "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                       body_len, body);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, SOCKET_PATH, sizeof addr.sun_path - 1);

    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror(SOCKET_PATH);
        return 1;
    }
    for (int sent = 0; sent < len;) {
        ssize_t n = write(fd, request + sent, len - sent);
        if (n <= 0) {
            perror("write");
            return 1;
        }
        sent += n;
    }
    size_t total = 0;
    ssize_t n;
    while (total < sizeof reply - 1 && (n = read(fd, reply + total, sizeof reply - 1 - total)) > 0)
        total += n;
    reply[total] = '\0';
    close(fd);
    fputs(reply, stdout);
    if (total && reply[total - 1] != '\n')
        fputc('\n', stdout);
    return strncmp(reply, "HTTP/1.0 200", 12) == 0 || strncmp(reply, "HTTP/1.1 200", 12) == 0 ? 0 : 1;
}

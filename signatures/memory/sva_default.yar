/*
 * sva default memory rules: Linux threats as they look in guest RAM.
 *
 * Written for raw physical memory, not files: no filesize, no offset-0 anchors, no modules.
 * Where a string also occurs in harmless text (a shell script, a man page, a parsed
 * script's syntax tree), the rules look for the shape the kernel gives a *running*
 * program's command line: argv strings laid end to end, each ending in a NUL
 * ("-o\0stratum+tcp://…\0"). That shape is on the process's stack page only once it runs.
 *
 * Tuning: each rule has `maturity` (test / stable) and MITRE ATT&CK technique ids.
 * Every rule must stay silent on a clean sva lab guest (tests/scan check this).
 */

rule SVA_Linux_CoinMiner_Stratum_Cmdline : linux miner
{
    meta:
        description = "A running process whose command line gives a stratum mining pool (-o/--url stratum+tcp://...) or a miner's --donate-level option"
        author = "sva"
        reference = "https://xmrig.com/docs/miner/command-line-options"
        mitre_attack = "T1496"
        maturity = "stable"
        date = "2026-11-27"

    strings:
        // argv: "-o" then the URL, as separate NUL-terminated strings
        $url_arg = /\x00(-o|--url)\x00stratum\+(tcp|ssl|tls):\/\/[\x21-\x7e]{3,255}\x00/
        $url_eq = /\x00--url=stratum\+(tcp|ssl|tls):\/\/[\x21-\x7e]{3,255}\x00/
        // "--donate-level=1" as one argv string between two others (not padding)
        $donate = /[\x21-\x7e]\x00--donate-level(=|\x00)[0-9]{1,3}\x00[\x21-\x7e]/

    condition:
        any of them
}

rule SVA_Linux_CoinMiner_XMRig_Strings : linux miner
{
    meta:
        description = "Strings of the XMRig miner itself (code or configuration in memory)"
        author = "sva"
        reference = "https://github.com/xmrig/xmrig"
        mitre_attack = "T1496"
        maturity = "test"
        date = "2026-11-27"

    strings:
        $donate_host = "donate.v2.xmrig.com" ascii
        $ua = /XMRig\/[0-9]\.[0-9]{1,2}\.[0-9]{1,2}/ ascii
        $opt_donate = "\"donate-level\":" ascii
        $opt_pool = "\"pools\":" ascii
        $algo_rx = "rx/0" ascii fullword
        $algo_cn = "cryptonight" ascii
        $randomx = "RandomX" ascii

    condition:
        3 of them
}

rule SVA_Linux_ReverseShell_DevTcp : linux reverse_shell
{
    meta:
        description = "An interactive shell redirected to a TCP socket through bash's /dev/tcp (bash -i >& /dev/tcp/HOST/PORT 0>&1)"
        author = "sva"
        reference = "https://attack.mitre.org/techniques/T1059/004/"
        mitre_attack = "T1059.004"
        maturity = "stable"
        date = "2026-11-27"

    strings:
        $i_first = /(ba|z|k)?sh -i *[0-9]?[<>&]{1,3} *\/dev\/(tcp|udp)\/[A-Za-z0-9.:_-]{1,253}\/[0-9]{1,5}/ ascii
        $exec_fd = /exec [0-9]{1,3}<>\/dev\/(tcp|udp)\/[A-Za-z0-9.:_-]{1,253}\/[0-9]{1,5}/ ascii

    condition:
        any of them
}

rule SVA_Linux_ReverseShell_Fifo_Cmdline : linux reverse_shell
{
    meta:
        description = "A running `sh -c` whose command pipes an interactive shell through a fifo to nc/telnet/openssl (mkfifo reverse shell)"
        author = "sva"
        reference = "https://attack.mitre.org/techniques/T1059/004/"
        mitre_attack = "T1059.004"
        maturity = "stable"
        date = "2026-11-27"

    strings:
        // argv of the shell running it: "-c" then the whole pipeline as one string
        $fifo_sh = /\x00-c\x00[^\x00]{0,256}mkfifo [^\x00]{1,256}\/bin\/(ba|da)?sh -i[^\x00]{0,128}\| *(nc|ncat|netcat|telnet|openssl) [^\x00]{1,128}\x00/

    condition:
        $fifo_sh
}

rule SVA_Linux_ReverseShell_Python : linux reverse_shell
{
    meta:
        description = "A Python one-liner that duplicates a socket onto stdin/stdout and starts a shell"
        author = "sva"
        reference = "https://attack.mitre.org/techniques/T1059/006/"
        mitre_attack = "T1059.006"
        maturity = "test"
        date = "2026-11-27"

    strings:
        $dup = /os\.dup2\( ?[a-z_]{1,16}\.fileno\(\) ?, ?0 ?\)/ ascii
        $pty = "pty.spawn(" ascii
        $sh = /subprocess\.(call|Popen|run)\( ?\[ ?["']\/bin\/(ba)?sh["'] ?, ?["']-i["']/ ascii

    condition:
        $dup and ($pty or $sh)
}

rule SVA_Linux_LD_PRELOAD_Writable_Dir : linux preload
{
    meta:
        description = "A process environment that preloads a library from a world-writable directory (LD_PRELOAD=/tmp/..., /dev/shm/..., /var/tmp/...)"
        author = "sva"
        reference = "https://attack.mitre.org/techniques/T1574/006/"
        mitre_attack = "T1574.006"
        maturity = "test"
        date = "2026-11-27"

    strings:
        $env = /\x00LD_PRELOAD=(\/tmp|\/dev\/shm|\/var\/tmp)\/[\x21-\x7e]{1,200}\x00/

    condition:
        $env
}
